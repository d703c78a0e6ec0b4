"""The training step never waits for the GPU, for every registered method but those listed in SYNCING.

On the CPU, `sync_guard.no_host_sync` makes every host-syncing operation raise (a proxy: it sees Python-level
calls only); where a GPU exists, the same steps run under `torch.cuda.set_sync_debug_mode("error")` and behind
a long GPU sleep, which a step that waits for the device cannot return before.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from sync_guard import HostSync, no_host_sync

from sparsecode.coder import Coder, build, methods
from sparsecode.data.source import TensorSource
from sparsecode.metrics import CodeStats
from sparsecode.sae.auxk import AuxKSAE as TopKSAE  # every SAE trained with AuxK (topk family, topafa, vsae)
from sparsecode.train import TrainConfig, Trainer

D, B = 16, 64

# Methods whose step still reads from the device, and why (README: What each method guarantees).
SYNCING = {
    "batchtopk": "the k·B picks fall unevenly on rows, and a Code has one width for all rows: the busiest "
                 "row's count is read from the device (a fixed width would be m, a dense code)",
    "matryoshka": "its default selection is batchtopk (see there); with selection=topk it is sync-free",
}

# small sizes, and options that make the step take its rarer branches too: dead latents from the second
# step on (AuxK), code restarts, dictionary growth, several chunks
SMALL: dict[str, dict[str, Any]] = {
    "topk": {"m": 256, "k": 4}, "abstopk": {"m": 256, "k": 4}, "batchtopk": {"m": 256, "k": 4},
    "matryoshka": {"m": 256, "k": 4}, "topafa": {"m": 256, "k": 8}, "vsae": {"m": 256, "k": 4}, "mp": {"k": 4},
    "refit": {"m": 256, "k": 4},
    "gba": {"groups": 4}, "itda": {"m": 256, "k": 4, "chunk": 16},
    "vq": {"restart_after": 0.5}, "rvq": {"restart_after": 0.5}, "codebook_features": {"k": 4},
    "kvbottleneck": {"heads": 4, "head_dim": 4, "kmeans_iters": 2},
    "vqbridge": {"hidden": 16, "heads": 2, "kmeans_iters": 2, "restart_after": 0.5},
    "frozen_projector": {"kmeans_iters": 2, "restart_after": 0.5}, "simvq": {"kmeans_iters": 2, "restart_after": 0.5},
    "vq_factorized": {"code_dim": 4}, "fsq": {}, "lfq": {},
    "latentquant": {},
}
FIXED_M = {"fsq", "lfq", "latentquant"}  # m follows from levels / bits / latent dims
# more branches: the dense references, Bernoulli bits (noise), a gradient-trained and a cosine codebook
VARIANTS = [("matryoshka", {"selection": "topk"}), ("topk", {"sparse_grad": False}), ("lfq", {"mode": "bernoulli"}),
            ("vq", {"ema": False}), ("vq", {"metric": "cosine"}), ("topafa", {"sparse_grad": False})]


def cases() -> list:
    out = []
    for name, extra in [(n, {}) for n in methods()] + VARIANTS:
        marks = [pytest.mark.xfail(strict=True, raises=(HostSync, RuntimeError), reason=SYNCING[name])] \
            if name in SYNCING and not extra else []
        out.append(pytest.param(name, extra, marks=marks, id=name + "".join(f"-{k}={v}" for k, v in extra.items())))
    return out


def options(name: str, extra: dict[str, Any]) -> dict[str, Any]:
    base = {"dead_tokens": 1} if name in FIXED_M else {"m": 64, "dead_tokens": 1}
    return {**base, **SMALL.get(name, {}), **extra}


def trainer_for(name: str, extra: dict[str, Any], run: Path, device: str = "cpu") -> Trainer:
    cfg = TrainConfig(method=name, coder=options(name, extra), steps=10, batch_size=B, init_rows=128, device=device,
                      warmup_steps=2)
    data = torch.randn(2048, D, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, run, source=TensorSource(data), progress=False)
    trainer.start()  # init_from_data: k-means, b_dec, the first atoms
    trainer.coder.train()
    return trainer


def as_on_cuda(trainer: Trainer) -> None:
    """Give a CPU trainer what a CUDA one has: a fused optimizer (its step count on the device, where the CPU
    default reads it on the host) and a device generator apart from the host one, which the guard forbids."""
    cfg = trainer.cfg
    if trainer.opt is not None:
        params = [p for p in trainer.coder.parameters() if p.requires_grad]
        trainer.opt = trainer.coder.make_optimizer(params, cfg.lr, cfg.betas, True)
        trainer.sched = torch.optim.lr_scheduler.LambdaLR(trainer.opt, cfg.lr_factor)
    trainer.device_generator = trainer.coder.device_generator = torch.Generator().manual_seed(1)


@pytest.mark.parametrize("gpu_paths", [False, True], ids=["cpu-paths", "gpu-paths"])
@pytest.mark.parametrize("name, extra", cases())
def test_train_step_reads_nothing_from_the_device(name, extra, gpu_paths, tmp_path, monkeypatch):
    """`gpu-paths`: the idle counters are treated as device memory, as on a GPU, so AuxK and restarts take
    their fixed-size paths; `cpu-paths` is a CPU run, where the host reads its own counters exactly."""
    if gpu_paths:
        monkeypatch.setattr(Coder, "reads_idle_directly", lambda self: False)
    trainer = trainer_for(name, extra, tmp_path / "run")
    as_on_cuda(trainer)
    coder, stats = trainer.coder, CodeStats(trainer.coder.cfg.m)
    for _ in range(2):  # the second step has dead latents (dead_tokens=1) and codes to restart
        x = trainer.source.next_batch(B).to(trainer.device)
        with no_host_sync(host_generator=trainer.generator):
            out, loss = trainer.train_step(x)
            stats.update(x, out.x_hat, out.code)  # what fit sums per step
    assert torch.isfinite(loss).item()
    if isinstance(coder, TopKSAE):
        assert "auxk" in out.losses  # AuxK took part in the guarded step
    if name in ("vq", "rvq"):
        assert out.stats["restarts"].item() > 0  # so did restarts


def test_the_guard_catches_a_step_that_reads_from_the_device(tmp_path, monkeypatch):
    """A method made to sync in after_step (as AuxK did with int(dead.sum())) fails under the guard."""
    trainer = trainer_for("topk", {}, tmp_path / "run")
    as_on_cuda(trainer)
    x = trainer.source.next_batch(B)
    with no_host_sync(host_generator=trainer.generator):
        trainer.train_step(x)  # the real step passes
    monkeypatch.setattr(type(trainer.coder), "after_step", lambda self: int(self.dead_mask().sum()))
    with pytest.raises(HostSync, match="__int__"), no_host_sync(host_generator=trainer.generator):
        trainer.train_step(x)


def test_the_host_knows_idle_counts_exactly_on_the_cpu_and_as_a_bound_on_a_gpu(monkeypatch):
    """AuxK and restarts size themselves from the idle counters: read on the CPU (the host's own memory);
    on a GPU bounded on the host by the tokens tracked since the last read, which happens outside steps."""
    sae = build("topk", {"d_in": 8, "m": 16, "k": 2, "dead_tokens": 5}).train()
    x = torch.randn(4, 8)
    sae(x)  # 4 tokens: the atoms that did not fire have been idle for 4
    assert sae.idle_count() == (int(sae.since_fired.max()), int(sae.dead_mask().sum())) == (4, 0)
    monkeypatch.setattr(Coder, "reads_idle_directly", lambda self: False)  # as on a GPU
    assert sae.idle_count() == (4, None)  # the bound: tokens tracked since construction
    sae(x)
    assert sae.idle_count() == (8, None) and "auxk" in sae(x).losses  # 8 ≥ dead_tokens: AuxK, fixed width
    sae.since_fired.fill_(0)  # a write from outside the trainer: read once (outside any step)
    assert sae.idle_count() == (0, None)


@pytest.mark.parametrize("op", [
    lambda x, i, g: x.sum().item(), lambda x, i, g: int(x.sum()), lambda x, i, g: float(x.max()),
    lambda x, i, g: bool(x.any()), lambda x, i, g: x.tolist(), lambda x, i, g: x.cpu(),
    lambda x, i, g: x.to("cpu"), lambda x, i, g: x.numpy(), lambda x, i, g: x[x > 0],
    lambda x, i, g: x.__setitem__(x > 0, 0.0), lambda x, i, g: x.index_put_((x > 0,), torch.tensor(0.0)),
    lambda x, i, g: torch.nonzero(x), lambda x, i, g: x.nonzero(), lambda x, i, g: torch.where(x > 0),
    lambda x, i, g: torch.unique(i), lambda x, i, g: torch.bincount(i), lambda x, i, g: x.masked_select(x > 0),
    lambda x, i, g: torch.multinomial(x.abs(), 1), lambda x, i, g: x[: i.max()],
    lambda x, i, g: x.repeat_interleave(i.clamp(0, 1)), lambda x, i, g: torch.randn(3, generator=g),
    lambda x, i, g: torch.empty(3).exponential_(generator=g), lambda x, i, g: torch.equal(x, x),
    lambda x, i, g: x.max() > 0 and None, lambda x, i, g: f"{x.sum():.3f}",
])
def test_the_guard_refuses_each_host_read(op):
    x, i, g = torch.randn(8), torch.randint(0, 4, (8,)), torch.Generator()
    with pytest.raises(HostSync), no_host_sync(host_generator=g):
        op(x, i, g)
    op(x, i, g)  # restored afterwards


def test_the_guard_lets_device_side_equivalents_through():
    x, i, g = torch.randn(8), torch.randint(0, 4, (8,)), torch.Generator()
    with no_host_sync(host_generator=g):
        x.masked_fill(x > 0, 0.0)
        torch.where(x > 0, x, 0.0)
        x[i]
        x.clone()[i] = 1.0
        torch.zeros(4, dtype=torch.long).scatter_add_(0, i, torch.ones_like(i))
        torch.randn(3, generator=torch.Generator())  # a generator on the device
        x.topk(3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, extra", cases())
def test_cuda_train_step_never_waits_for_the_gpu(name, extra, tmp_path):
    trainer = trainer_for(name, extra, tmp_path / "run", device="cuda")
    x = trainer.source.next_batch(B).to(trainer.device)
    for _ in range(2):  # warm-up outside the check: lazy CUDA/cuBLAS set-up, Triton compiles
        trainer.train_step(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.train_step(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # syncs inside kernels (Thrust, cuSPARSE) escape the debug mode: a step that waits for the device cannot
    # return before a long GPU sleep queued ahead of it ends
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(10**8)
    torch.cuda.synchronize()
    cycles = int(10**8 * 2.0 / max(time.perf_counter() - t0, 1e-3))  # about 2 s of GPU time
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    trainer.train_step(x)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert host < 1.0, f"{name}: the step returned after {host:.2f} s, behind a 2 s GPU sleep: it waited"
