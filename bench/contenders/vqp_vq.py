"""vector-quantize-pytorch `VectorQuantize` (EMA) in train mode."""

from __future__ import annotations

from pathlib import Path

import torch
from throughput_harness import Contender, module_state_bytes
from torch import Tensor


def build(sizes: dict[str, int], x: Tensor, dev: torch.device, run: Path, args) -> Contender:
    from vector_quantize_pytorch import VectorQuantize

    vq = VectorQuantize(dim=sizes["dim"], codebook_size=sizes["K"], decay=0.99, commitment_weight=0.25,
                        kmeans_init=False, threshold_ema_dead_code=0, rotation_trick=False).to(dev)
    vq.train()

    def step(x: Tensor):  # its default precision (fp32 codebook search), as sparsecode's VQ runs
        _, _, loss = vq(x[None])
        return loss

    return Contender("vector-quantize-pytorch", "vqp", step, lambda: module_state_bytes(vq, []),
                     "VectorQuantize(x[None]) in train mode: cdist → argmax → one-hot quantize → EMA update "
                     "(decay 0.99) → commitment loss 0.25; dead-code replacement off (its default), no backward")
