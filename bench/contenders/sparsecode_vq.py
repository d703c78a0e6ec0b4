"""sparsecode `vq` (EMA) through `Trainer.train_step`."""

from __future__ import annotations

from pathlib import Path

import torch
from throughput_harness import Contender, module_state_bytes
from torch import Tensor

from .sparsecode_topk import sparsecode_trainer


def build(sizes: dict[str, int], x: Tensor, dev: torch.device, run: Path, args) -> Contender:
    coder = {"m": sizes["K"], "init": "random", "restart_after": 0, "decay": 0.99, "beta": 0.25}
    tr = sparsecode_trainer("vq", coder, x, x.shape[0], dev, run, args.train_opt, steps=10**9, init_rows=0)
    return Contender("sparsecode", "sparsecode", tr.train_step,
                     lambda: module_state_bytes(tr.coder, [tr.opt] if tr.opt else []),
                     "Trainer.train_step(x): VQ.forward (nearest-code search: fused Triton kernel on CUDA, chunked "
                     "on CPU; EMA update, commitment loss; restarts off, kmeans init off) → no backward (EMA "
                     "codebook has no gradient)")
