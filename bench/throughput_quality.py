"""The quality check of bench/throughput.py: sparsecode (`Trainer.fit`) against the plain fp32 reference."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from contenders.plain_topk import DenseTopK, plain_trainer
from throughput_harness import LR, features, fvu_of, sample

from sparsecode.data.source import TensorSource
from sparsecode.train import TrainConfig, Trainer


def quality(d: int, m: int, k: int, batch: int, steps: int, dev: torch.device, args) -> dict[str, Any]:
    """sparsecode (Trainer.fit) vs the plain fp32 reference: same initial weights, same data stream, same
    schedule; FVU on a held-out batch after `steps` steps."""
    feats = features(m // 2, d, seed=11)
    data, held = sample(feats, batch * 16, seed=12), sample(feats, batch, seed=13).to(dev)
    idle_batches = 2  # short, so that some latents die and AuxK is exercised in both
    dead_tokens, init_rows = idle_batches * batch, 4 * batch
    sched = {"warmup_steps": 20, "decay": "cosine", "min_lr_ratio": 0.1, "grad_clip": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TrainConfig(method="topk", coder={"m": m, "k": k, "dead_tokens": dead_tokens}, steps=steps,
                           batch_size=batch, lr=LR, init_rows=init_rows, device=str(dev), seed=0, **sched)
        for key, value in args.train_opt.items():
            setattr(tcfg, key, value)
        trainer = Trainer(tcfg, Path(tmp) / "q", TensorSource(data, seed=0), progress=False)
        ref = DenseTopK(d, m, k, dead_tokens=dead_tokens).to(dev)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec"):
                getattr(ref, name).copy_(getattr(trainer.coder, name))
        t0 = time.perf_counter()
        trainer.start()
        trainer.fit()
        t_sc = time.perf_counter() - t0
        ours = trainer.coder.eval()
        with torch.no_grad():
            fvu_sc = fvu_of(held, ours(held).x_hat)

    def factor(s: int) -> float:  # the same warm-up + cosine schedule, written out
        if s < sched["warmup_steps"]:
            return (s + 1) / sched["warmup_steps"]
        t = min((s - sched["warmup_steps"]) / max(1, steps - sched["warmup_steps"]), 1.0)
        return sched["min_lr_ratio"] + (1 - sched["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * t))

    src = TensorSource(data, seed=0)
    with torch.no_grad():
        ref.b_dec.copy_(src.next_batch(init_rows).to(dev).mean(0))
    step, _ = plain_trainer(ref, dev, False, factor)
    ref.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(src.next_batch(batch).to(dev))
    t_ref = time.perf_counter() - t0
    ref.eval()
    with torch.no_grad():
        fvu_ref = fvu_of(held, ref(held)[0])
    rel = abs(fvu_sc - fvu_ref) / fvu_ref
    return {"kind": "quality", "d": d, "m": m, "k": k, "batch": batch, "steps": steps, "fvu_sparsecode": fvu_sc,
            "fvu_reference": fvu_ref, "rel_diff": rel, "met": rel <= 0.01, "dead_after_batches": idle_batches,
            "seconds_sparsecode": t_sc, "seconds_reference": t_ref,
            "dead_sparsecode": float((trainer.coder.since_fired >= dead_tokens).float().mean()),
            "dead_reference": float((ref.since_fired >= dead_tokens).float().mean())}
