"""SAELens `TopKTrainingSAE` through `SAETrainer.step`."""

from __future__ import annotations

from pathlib import Path

import torch
from throughput_harness import LR, Contender, module_state_bytes
from torch import Tensor


def build(sizes: dict[str, int], x: Tensor, dev: torch.device, run: Path, args) -> Contender:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d, m, k = sizes["d"], sizes["m"], sizes["k"]
    B = x.shape[0]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, device=str(dev)))
    tcfg = SAETrainerConfig(total_training_samples=B * 10**9, train_batch_size_samples=B, lr=LR,
                            lr_end=LR / 10, device=str(dev), autocast=dev.type == "cuda")
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))
    sae.train()
    return Contender("SAELens", "saelens", trainer.step,
                     lambda: module_state_bytes(sae, [trainer.optimizer]),
                     "SAETrainer.step(x): [autocast] TopKTrainingSAE.training_forward_pass (MSE + TopK aux loss, "
                     "acts rescaled by ‖W_dec‖, no renorm) + dead-neuron stats → backward → clip_grad_norm_(1.0) "
                     "→ Adam.step → zero_grad → lr_scheduler.step")
