"""SAELens `MatchingPursuitTrainingSAE` through `SAETrainer.step`, held to k pursuit steps like sparsecode."""

from __future__ import annotations

from pathlib import Path

import torch
from throughput_harness import LR, Contender, module_state_bytes
from torch import Tensor


def build(sizes: dict[str, int], x: Tensor, dev: torch.device, run: Path, args) -> Contender:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.matching_pursuit_sae import MatchingPursuitTrainingSAE, MatchingPursuitTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    d, m, k = sizes["d"], sizes["m"], sizes["k"]
    B = x.shape[0]
    # max_iterations = k and no early stop: every row takes the k steps sparsecode takes (SAELens's defaults,
    # d_in steps with a stop on a repeated support or a residual norm < 0.01, are a different amount of work)
    cfg = MatchingPursuitTrainingSAEConfig(d_in=d, d_sae=m, max_iterations=k, residual_threshold=0.0,
                                           stop_on_duplicate_support=False, device=str(dev))
    sae = MatchingPursuitTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))  # as sparsecode's init_from_data
    tcfg = SAETrainerConfig(total_training_samples=B * 10**9, train_batch_size_samples=B, lr=LR,
                            lr_end=LR / 10, device=str(dev), autocast=dev.type == "cuda")
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))
    sae.train()
    return Contender("SAELens", "saelens", trainer.step, lambda: module_state_bytes(sae, [trainer.optimizer]),
                     f"SAETrainer.step(x): [autocast on CUDA] MatchingPursuitTrainingSAE.training_forward_pass "
                     f"(max_iterations={k}, no early stop: dense [B, m] acts, scatter_add per step, dense decode) "
                     "→ backward → clip_grad_norm_(1.0) → Adam.step → zero_grad → lr_scheduler.step")
