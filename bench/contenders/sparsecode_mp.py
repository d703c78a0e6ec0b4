"""sparsecode `mp` (matching-pursuit SAE, T = k steps) through `Trainer.train_step`."""

from __future__ import annotations

from pathlib import Path

import torch
from throughput_harness import Contender, module_state_bytes
from torch import Tensor

from .sparsecode_topk import sparsecode_trainer


def build(sizes: dict[str, int], x: Tensor, dev: torch.device, run: Path, args) -> Contender:
    tr = sparsecode_trainer("mp", {"m": sizes["m"], "k": sizes["k"], **args.mp_opt}, x, x.shape[0], dev, run,
                            args.train_opt, steps=10**9, init_rows=x.shape[0])
    return Contender("sparsecode", "sparsecode", tr.train_step, lambda: module_state_bytes(tr.coder, [tr.opt]),
                     f"Trainer.train_step(x): MPSAE.forward (k = {sizes['k']} pursuit steps, every row all k) → "
                     "FVU → backward → after_backward (parallel-grad removal) → clip_grad_norm_(1.0) → Adam.step "
                     f"→ LambdaLR.step → after_step (renorm) [bf16 autocast {'on' if tr.bf16 else 'off'}]")
