"""The throughput harness: the data, the contender record, timing and the round-robin run of one case.

Used by bench/throughput.py; the contenders themselves are in bench/contenders/, one module each.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from throughput_memory import step_peak_bytes
from torch import Tensor, nn

LR = 1e-3


# --- small helpers --------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast(dev: torch.device, on: bool = True):
    """bf16 autocast on CUDA (the peers' and the issue's setting); nothing on CPU."""
    if on and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tensor_bytes(*groups) -> int:
    seen, total = set(), 0
    for group in groups:
        for t in group:
            if isinstance(t, Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def module_state_bytes(module: nn.Module, opts: list[torch.optim.Optimizer]) -> int:
    opt_state = [v for o in opts for s in o.state.values() for v in s.values() if isinstance(v, Tensor)]
    return tensor_bytes(module.parameters(), module.buffers(), opt_state)


def features(n: int, d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def sample(feats: Tensor, n: int, seed: int, active: int = 16, noise: float = 0.05) -> Tensor:
    """[n, d] rows that are sparse non-negative sums of `active` of the given features, plus noise."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(feats.shape[0], (n, active), generator=g)
    w = torch.empty(n, active).exponential_(generator=g)
    return F.embedding_bag(idx, feats, per_sample_weights=w, mode="sum") + noise * torch.randn(
        n, feats.shape[1], generator=g)


def fvu_of(x: Tensor, x_hat: Tensor) -> float:
    x, x_hat = x.float(), x_hat.float()
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


# --- contenders and cases -------------------------------------------------------------------------
@dataclass
class Contender:
    name: str
    lib: str  # sparsecode | saelens | sparsify | plain | vqp
    step: Callable[[Tensor], Any]
    state: Callable[[], int]
    how: str  # the calls that make up one step


@dataclass
class Case:
    kind: str  # topk | vq
    label: str
    sizes: dict[str, int]
    x: Tensor
    contenders: list[Contender] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    scalable: bool = False  # may halve the rows when a step is too slow (VQ on CPU)


# build(sizes, x, dev, run, args) -> Contender: what every module in bench/contenders/ provides
Builder = Callable[[dict[str, int], Tensor, torch.device, Path, Any], Contender]


def guarded(case: Case, name: str, build: Builder, dev: torch.device, run: Path, args) -> None:
    """Add a contender; a peer that is not installed (or fails to build) is skipped with a note."""
    try:
        case.contenders.append(build(case.sizes, case.x, dev, run, args))
    except Exception as e:  # noqa: BLE001 - a missing peer must not stop the benchmark
        case.skipped[name] = f"{type(e).__name__}: {e}"[:200]


# --- running --------------------------------------------------------------------------------------
def timed(step: Callable[[Tensor], Any], x: Tensor, dev: torch.device) -> float:
    sync(dev)
    t0 = time.perf_counter()
    step(x)
    sync(dev)
    return time.perf_counter() - t0


def run_case(case: Case, dev: torch.device, args) -> list[dict[str, Any]]:
    cs, x = case.contenders, case.x
    # warm-up (interleaved); on CPU a VQ case halves its rows while any step is slower than --max-step-s
    done = 0
    while done < args.warmup:
        slowest = max(timed(c.step, x, dev) for c in cs)
        done += 1
        if case.scalable and slowest > args.max_step_s and x.shape[0] > 1024:
            x, done = x[: x.shape[0] // 2], 0
            case.sizes["rows"] = x.shape[0]
            print(f"  {case.label}: a warm step took {slowest:.2f}s > {args.max_step_s}s, scaled to {x.shape[0]} rows",
                  flush=True)
    times: dict[str, list[float]] = {c.name: [] for c in cs}
    rounds: list[dict[str, float]] = []
    for r in range(args.rounds):
        order = cs[r % len(cs):] + cs[: r % len(cs)]
        per = {}
        for c in order:
            ts = [timed(c.step, x, dev) for _ in range(args.steps)]
            times[c.name] += ts
            per[c.name] = statistics.median(ts)
        rounds.append(per)
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in per.items()),
              flush=True)
    ours = "sparsecode"
    rows = []
    for c in cs:
        med = statistics.median(times[c.name])
        rec = {"kind": "step", "case": case.kind, "label": case.label, **case.sizes, "contender": c.name,
               "lib": c.lib, "step_ms": med * 1e3, "step_ms_min": min(times[c.name]) * 1e3,
               "steps_timed": len(times[c.name]), "rows_per_s": x.shape[0] / med,
               "step_peak_mib": None, "state_mib": c.state() / 2**20, "how": c.how}
        if ours in times and c.name != ours:  # sparsecode's speed-up over this contender, paired by round
            rec["sparsecode_speedup"] = statistics.median(p[c.name] / p[ours] for p in rounds)
        rows.append(rec)
    for c, rec in zip(cs, rows, strict=True):
        peak = step_peak_bytes(c.step, x, dev)
        rec["step_peak_mib"] = None if peak is None else peak / 2**20
    return rows


def measure_floor(d: int, m: int, B: int, dev: torch.device, reps: int = 20) -> dict[str, float]:
    """The issue's floor on this GPU: bf16 encoder matmul + one fused Adam pass over W_enc and W_dec."""
    x = torch.randn(B, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(m, d, device=dev, dtype=torch.bfloat16)
    params = [torch.zeros(m, d, device=dev, requires_grad=True) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.Adam(params, lr=LR, fused=True)

    def med(fn):
        for _ in range(3):
            fn()
        return statistics.median(timed(lambda _x: fn(), x, dev) for _ in range(reps))

    t_mm, t_opt = med(lambda: x @ w.t()), med(opt.step)
    return {"matmul_ms": t_mm * 1e3, "adam_ms": t_opt * 1e3, "floor_tok_s": B / (t_mm + t_opt)}
