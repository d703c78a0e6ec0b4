"""sparsecode `topk` through `Trainer.train_step` (what `fit` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from throughput_harness import LR, Contender, module_state_bytes
from torch import Tensor

from sparsecode.data.source import TensorSource
from sparsecode.train import TrainConfig, Trainer


def sparsecode_trainer(method: str, coder: dict[str, Any], data: Tensor, batch: int, dev: torch.device,
                       run: Path, train_opts: dict[str, Any], **cfg: Any) -> Trainer:
    tcfg = TrainConfig(method=method, coder=coder, batch_size=batch, lr=LR, device=str(dev), **cfg)
    for key, value in train_opts.items():
        if not hasattr(tcfg, key):
            raise SystemExit(f"--train-opt {key}: TrainConfig has no such field")
        setattr(tcfg, key, value)
    trainer = Trainer(tcfg, run, TensorSource(data.cpu(), seed=0), progress=False)
    trainer.start()
    trainer.coder.train()
    return trainer


def build(sizes: dict[str, int], x: Tensor, dev: torch.device, run: Path, args) -> Contender:
    m, k = sizes["m"], sizes["k"]
    tr = sparsecode_trainer("topk", {"m": m, "k": k}, x, x.shape[0], dev, run, args.train_opt,
                            steps=10**9, init_rows=x.shape[0])
    return Contender("sparsecode", "sparsecode", tr.train_step,
                     lambda: module_state_bytes(tr.coder, [tr.opt]),
                     "Trainer.train_step(x): coder(x) → sum(losses) → backward → after_backward (parallel-grad "
                     "removal) → clip_grad_norm_(1.0) → Adam.step → LambdaLR.step → after_step (renorm) "
                     f"[precision {tr.cfg.precision}: bf16 autocast {'on' if tr.bf16 else 'off'}; "
                     f"{'fused' if tr.device.type == 'cuda' else 'foreach'} Adam]")
