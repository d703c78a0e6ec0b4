"""Training-step throughput of sparsecode against its peers, side by side in one run (issue 8).

One full training step each (forward, losses, backward, gradient handling, optimizer, decoder renorm), on
the same device, the same sizes and the same fixed batch, in one process:

  TopK  sparsecode `topk` through `Trainer.train_step` (what `fit` runs), SAELens `TopKTrainingSAE` through
        `SAETrainer.step`, EleutherAI sparsify `SparseCoder` driven as its trainer does, and a plain-PyTorch
        dense TopK SAE written here (dense decoder `z @ W_dec`) that mirrors sparsecode's algorithm.
  VQ    sparsecode `vq` (EMA) through `Trainer.train_step`, vector-quantize-pytorch `VectorQuantize` (EMA).

Contenders are interleaved round-robin (the first one rotates every round), so a load spike on a shared
machine hits all of them; each figure is the median of the timed steps, warm-up steps excluded, and the
ratios are medians over rounds of per-round paired ratios. On a GPU each step is bracketed by
`torch.cuda.synchronize()`, the TopK peers run under bf16 autocast (SAELens `autocast=True`, sparsify's
own autocast, the plain SAE under `torch.autocast`; the VQ contenders keep their default fp32), and the
floor of the issue (bf16 encoder matmul + one fused Adam pass over W_enc and W_dec) is measured too.

Memory: "step peak" is the transient memory one step adds on top of what was allocated before it
(GPU: `torch.cuda.max_memory_allocated()` − `memory_allocated()` before; CPU: the process's peak RSS
(VmHWM, reset through /proc/self/clear_refs) − RSS before, after glibc `malloc_trim(0)` so that heap
memory the step reuses counts too); "state" is parameters + buffers + optimizer
state of the contender. Peers that are not installed are skipped with a note.

A quality check trains sparsecode (`Trainer.fit`) and the plain reference from the same initial weights on
the same data stream for a fixed number of steps and compares their FVU on a held-out batch (goal: within 1%).

    .venv-bench/bin/python bench/throughput.py                      # CPU suite (or the GPU suite on CUDA)
    .venv-bench/bin/python bench/throughput.py --rounds 3 --only topk --out /tmp/t.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsecode.data.source import TensorSource
from sparsecode.train import TrainConfig, Trainer

RESULTS = Path(__file__).resolve().parent / "results"
CPU_TOPK = [(256, 4096, 32), (512, 8192, 32)]  # (d, m, k)
GPU_TOPK = [(768, 24576, 32), (2304, 65536, 64)]
CPU_VQ = [(256, 1024), (256, 8192)]  # (dim, K)
GPU_VQ = [(256, 8192), (256, 65536)]
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


# --- memory ---------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand free heap pages back to the OS (glibc), so memory the step reuses from the heap counts in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_peak_bytes(step: Callable[[Tensor], Any], x: Tensor, dev: torch.device) -> int | None:
    """Transient memory of one step above what was in use before it (see the module docstring)."""
    gc.collect()
    if dev.type == "cuda":
        sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step(x)
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    if not _can_reset_hwm():  # not Linux: no per-step peak RSS
        return None
    _malloc_trim()
    base = _status_kb("VmRSS")
    step(x)
    return max(0, _status_kb("VmHWM") - base) * 1024


# --- contenders -----------------------------------------------------------------------------------
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


def sc_topk(d, m, k, x, dev, run, args) -> Contender:
    tr = sparsecode_trainer("topk", {"m": m, "k": k}, x, x.shape[0], dev, run, args.train_opt,
                            steps=10**9, init_rows=x.shape[0])
    return Contender("sparsecode", "sparsecode", tr.train_step,
                     lambda: module_state_bytes(tr.coder, [tr.opt]),
                     "Trainer.train_step(x): coder(x) → sum(losses) → backward → after_backward (parallel-grad "
                     "removal) → clip_grad_norm_(1.0) → Adam.step → LambdaLR.step → after_step (renorm) "
                     f"[precision {tr.cfg.precision}: bf16 autocast {'on' if tr.bf16 else 'off'}; "
                     f"{'fused' if tr.device.type == 'cuda' else 'foreach'} Adam]")


def saelens_topk(d, m, k, x, dev, args) -> Contender:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

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


def sparsify_topk(d, m, k, x, dev, args) -> Contender:
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    sae = SparseCoder(d, SparseCoderConfig(k=k, num_latents=m), device=dev)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    sched = get_linear_schedule_with_warmup(opt, 1000, 10**9)
    since_fired = torch.zeros(m, dtype=torch.long, device=dev)
    did_fire = torch.zeros(m, dtype=torch.bool, device=dev)
    auxk_alpha, threshold = 1 / 32, 10_000_000  # sparsify's 'auxk_alpha' is 0 by default; enable AuxK

    def step(x: Tensor):
        # the order of sparsify.Trainer.fit for an SAE-local 'fvu' loss, one micro-batch
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > threshold
        out = sae(x, dead_mask=dead_mask)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
        return loss

    return Contender("sparsify", "sparsify", step, lambda: module_state_bytes(sae, [opt]),
                     "as sparsify.Trainer.fit: set_decoder_norm_to_unit_norm → SparseCoder(x, dead_mask) "
                     "[own cuda autocast; fused_encoder; Triton decoder if installed] → fvu + auxk/32 → backward "
                     "→ remove_gradient_parallel_to_decoder_directions → Adam.step → zero_grad → "
                     "linear warm-up schedule.step → tokens-since-fired update")


class DenseTopK(nn.Module):
    """Plain-PyTorch TopK SAE: sparsecode's TopK algorithm (ReLU of the top k, AuxK, unit-norm atoms) with the
    obvious dense decoder z @ W_dec. The speed baseline, and the reference of the quality check."""

    def __init__(self, d: int, m: int, k: int, dead_tokens: int = 1_000_000, aux_coef: float = 1 / 32):
        super().__init__()
        w = F.normalize(torch.randn(m, d), dim=1)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("since_fired", torch.zeros(m, dtype=torch.long))
        self.k, self.dead_tokens, self.aux_coef = k, dead_tokens, aux_coef

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        x_hat = z @ self.W_dec + self.b_dec
        tv = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = (x - x_hat).pow(2).sum() / tv
        if self.training:
            dead = self.since_fired >= self.dead_tokens
            n_dead = int(dead.sum())
            if n_dead:
                av, ai = pre.masked_fill(~dead, float("-inf")).topk(min(x.shape[1] // 2, n_dead), dim=1,
                                                                    sorted=False)
                r_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ self.W_dec
                loss = loss + self.aux_coef * ((x - x_hat).detach() - r_hat).pow(2).sum() / tv
            with torch.no_grad():
                self.since_fired += x.shape[0]
                self.since_fired[(z != 0).any(0)] = 0
        return x_hat, loss


def plain_trainer(sae: DenseTopK, dev: torch.device, amp: bool, lr_factor: Callable[[int], float]):
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    def step(x: Tensor):
        with autocast(dev, amp):
            _, loss = sae(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g, w = sae.W_dec.grad, sae.W_dec
            g -= (g * w).sum(1, keepdim=True) * w
        torch.nn.utils.clip_grad_norm_(list(sae.parameters()), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        return loss

    return step, opt


def plain_topk(d, m, k, x, dev, args) -> Contender:
    sae = DenseTopK(d, m, k).to(dev)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    step, opt = plain_trainer(sae, dev, True, lambda s: 1.0)
    return Contender("plain PyTorch (dense)", "plain", step, lambda: module_state_bytes(sae, [opt]),
                     "[autocast] addmm encoder → topk → scatter into dense z [B, m] → z @ W_dec → FVU (+AuxK) → "
                     "backward → parallel-grad removal → clip_grad_norm_(1.0) → Adam.step → renorm")


def sc_vq(dim, K, x, dev, run, args) -> Contender:
    coder = {"m": K, "kmeans_init": False, "restart_after": 0, "decay": 0.99, "beta": 0.25}
    tr = sparsecode_trainer("vq", coder, x, x.shape[0], dev, run, args.train_opt, steps=10**9, init_rows=0)
    return Contender("sparsecode", "sparsecode", tr.train_step,
                     lambda: module_state_bytes(tr.coder, [tr.opt] if tr.opt else []),
                     "Trainer.train_step(x): VQ.forward (nearest-code search: fused Triton kernel on CUDA, chunked "
                     "on CPU; EMA update, commitment loss; restarts off, kmeans init off) → no backward (EMA "
                     "codebook has no gradient)")


def vqp_vq(dim, K, x, dev, args) -> Contender:
    from vector_quantize_pytorch import VectorQuantize

    vq = VectorQuantize(dim=dim, codebook_size=K, decay=0.99, commitment_weight=0.25, kmeans_init=False,
                        threshold_ema_dead_code=0, rotation_trick=False).to(dev)
    vq.train()

    def step(x: Tensor):  # its default precision (fp32 codebook search), as sparsecode's VQ runs
        _, _, loss = vq(x[None])
        return loss

    return Contender("vector-quantize-pytorch", "vqp", step, lambda: module_state_bytes(vq, []),
                     "VectorQuantize(x[None]) in train mode: cdist → argmax → one-hot quantize → EMA update "
                     "(decay 0.99) → commitment loss 0.25; dead-code replacement off (its default), no backward")


def guarded(case: Case, name: str, build: Callable[[], Contender]) -> None:
    """Add a contender; a peer that is not installed (or fails to build) is skipped with a note."""
    try:
        case.contenders.append(build())
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


# --- reporting ------------------------------------------------------------------------------------
def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def goals(rows: list[dict[str, Any]], qual: dict[str, Any] | None, floors: dict[str, dict], gpu: bool):
    out = []

    def speedup(label: str, lib: str) -> float | None:
        r = [x for x in rows if x["label"] == label and x["lib"] == lib and "sparsecode_speedup" in x]
        return r[0]["sparsecode_speedup"] if r else None

    def goal(text: str, ratio: float | None, need: float, unit: str = "×"):
        verdict = "not measured" if ratio is None else ("met" if ratio >= need else "not met")
        shown = "n/a" if ratio is None else (f"{ratio:.2f}{unit}" if unit == "×" else f"{ratio:.0%}")
        out.append({"kind": "goal", "goal": text, "need": need, "ratio": ratio, "verdict": verdict,
                    "line": f"{text}: **{verdict}** ({shown})"})

    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        kind = next(r["case"] for r in rows if r["label"] == label)
        if kind == "topk" and not gpu:
            goal(f"CPU {label} ≥ 1.5× SAELens", speedup(label, "saelens"), 1.5)
        if kind == "vq" and not gpu:
            goal(f"CPU {label} ≥ 2× vector-quantize-pytorch", speedup(label, "vqp"), 2.0)
        if kind == "topk" and gpu and "m=24576" in label:
            sc = next((r for r in rows if r["label"] == label and r["lib"] == "sparsecode"), None)
            fl = floors.get(label)
            share = sc["rows_per_s"] / fl["floor_tok_s"] if sc and fl else None
            goal(f"GPU {label} ≥ 50% of the floor", share, 0.5, unit="%")
            goal(f"GPU {label} ≥ 5× sparsify", speedup(label, "sparsify"), 5.0)
        if kind == "topk" and gpu and "m=65536" in label:
            goal(f"GPU {label} ≥ 4× sparsify", speedup(label, "sparsify"), 4.0)
        if kind == "vq" and gpu and "K=65536" in label:
            goal(f"GPU {label} ≥ 10× vector-quantize-pytorch", speedup(label, "vqp"), 10.0)
    if qual is not None:
        out.append({"kind": "goal", "goal": "quality: FVU within 1% of the reference", "need": 0.01,
                    "ratio": qual["rel_diff"], "verdict": "met" if qual["met"] else "not met",
                    "line": f"quality: FVU within 1% of the reference: **{'met' if qual['met'] else 'not met'}** "
                            f"({qual['rel_diff']:.2%} apart: {qual['fvu_sparsecode']:.4f} vs "
                            f"{qual['fvu_reference']:.4f})"})
    return out


def markdown(meta: dict[str, Any], rows, cases: list[Case], qual, goal_rows, floors) -> str:
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    v = meta["versions"]
    peers = ", ".join(f"{pkg} {v.get(pkg, '–')}" for pkg in ("sae-lens", "eai-sparsify", "vector-quantize-pytorch"))
    lines = [f"### Training-step throughput, {meta['device']} ({meta['date']})", "",
             f"torch {meta['torch']}, {meta['threads']} threads, python {meta['python']}; {peers}; "
             f"load average at start {meta['loadavg']}; sparsecode at {meta['git']}", "",
             f"Command: `{meta['command']}`", "",
             f"Median of {meta['rounds']}×{meta['steps']} timed steps per contender after {meta['warmup']} warm-up "
             f"steps, contenders interleaved round-robin. ×: sparsecode's speed-up over that contender "
             f"(median of per-round ratios). Step peak: {meta['memory']}. "
             f"State: parameters + buffers + optimizer state.",
             "", "| case | contender | ms / step | rows/s | sparsecode × | step peak MiB | state MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['contender']} | {r['step_ms']:.1f} | {r['rows_per_s']:,.0f} | "
                     f"{fmt(r.get('sparsecode_speedup'), '.2f')} | {fmt(r['step_peak_mib'], ',.0f')} | "
                     f"{r['state_mib']:,.1f} |")
    for label, fl in floors.items():
        lines.append(f"\nFloor {label}: bf16 matmul {fl['matmul_ms']:.2f} ms + fused Adam {fl['adam_ms']:.2f} ms = "
                     f"{fl['floor_tok_s'] / 1e6:.2f}M tok/s")
    skipped = [f"{c.label} {n}: {why}" for c in cases for n, why in c.skipped.items()]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    scaled = [c.label for c in cases if c.scalable and c.sizes.get("rows") != c.sizes.get("rows_asked")]
    if scaled:
        lines += ["", "Scaled down (a step took longer than --max-step-s): " + ", ".join(scaled)]
    if qual is not None:
        lines += ["", f"Quality: TopK d={qual['d']} m={qual['m']} k={qual['k']}, batch {qual['batch']}, "
                      f"{qual['steps']} steps, AuxK for latents idle {qual['dead_after_batches']} batches "
                      f"(dead at the end: "
                      f"{qual['dead_sparsecode']:.1%} / {qual['dead_reference']:.1%}): held-out FVU sparsecode "
                      f"{qual['fvu_sparsecode']:.4f}, plain fp32 reference {qual['fvu_reference']:.4f}."]
    lines += ["", "Goals (issue 8):", ""] + [f"- {g['line']}" for g in goal_rows]
    return "\n".join(lines) + "\n"


def git_state() -> str:
    """The commit measured, and whether sparsecode/ or bench/ differ from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "sparsecode", "bench/throughput.py"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sparsecode", "sae-lens", "eai-sparsify", "vector-quantize-pytorch", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def parse_sizes(text: str, n: int) -> list[tuple[int, ...]]:
    out = []
    for part in filter(None, text.split(",")):
        nums = tuple(int(v) for v in part.lower().split("x"))
        if len(nums) != n:
            raise SystemExit(f"bad size {part!r}: expected {n} numbers joined by 'x'")
        out.append(nums)
    return out


def parse_opt(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--only", choices=["all", "topk", "vq"], default="all")
    p.add_argument("--topk", help="TopK sizes d x m x k, comma-separated (default: the device's suite)")
    p.add_argument("--vq", help="VQ sizes dim x K, comma-separated (default: the device's suite)")
    p.add_argument("--batch", type=int, default=4096, help="tokens per TopK step")
    p.add_argument("--vq-rows", type=int, default=16384, help="vectors per VQ step")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5 CPU, 10 GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per contender per round (2 CPU, 10 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per contender (2 CPU, 5 GPU)")
    p.add_argument("--max-step-s", type=float, default=None,
                   help="on CPU, halve a VQ case's rows while a step takes longer (default 2; GPU: never)")
    p.add_argument("--quality-steps", type=int, default=200, help="0 skips the quality check")
    p.add_argument("--quality-batch", type=int, default=None, help="default 256 on CPU, 4096 on GPU")
    p.add_argument("--train-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="set a TrainConfig field for sparsecode (value parsed as JSON), e.g. a precision option")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="JSON lines (default bench/results/throughput-<device>.jsonl)")
    p.add_argument("--md", type=Path, help="markdown table (default: next to --out, .md)")
    args = p.parse_args(argv)
    args.train_opt = dict(parse_opt(o) for o in args.train_opt)
    warnings.filterwarnings("ignore")

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    gpu = dev.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (10 if gpu else 5)
    args.steps = args.steps or (10 if gpu else 2)
    args.warmup = args.warmup or (5 if gpu else 2)
    args.max_step_s = args.max_step_s or (math.inf if gpu else 2.0)
    args.quality_batch = args.quality_batch or (4096 if gpu else 256)
    topk = parse_sizes(args.topk, 3) if args.topk else (GPU_TOPK if gpu else CPU_TOPK)
    vqs = parse_sizes(args.vq, 2) if args.vq else (GPU_VQ if gpu else CPU_VQ)
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-") if gpu else "cpu"
    out = args.out or RESULTS / f"throughput-{slug}.jsonl"
    md = args.md or out.with_suffix(".md")

    exe = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else sys.executable
    meta = {"kind": "meta", "device": device_name(dev), "device_kind": slug,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg": " ".join(f"{v:.1f}" for v in os.getloadavg()),
            "command": " ".join([exe, *sys.argv]), "rounds": args.rounds, "steps": args.steps,
            "warmup": args.warmup, "versions": versions(), "git": git_state(), "autocast_peers": gpu,
            "train_opt": args.train_opt,
            "memory": ("torch.cuda.max_memory_allocated() − memory_allocated() before the step" if gpu else
                       "peak RSS (VmHWM after clear_refs) − RSS before the step, after malloc_trim(0)")}
    print(f"{meta['device']}, torch {meta['torch']}, {meta['threads']} threads, load {meta['loadavg']}", flush=True)

    rows: list[dict[str, Any]] = []
    cases: list[Case] = []
    floors: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in ("all", "topk"):
            for i, (d, m, k) in enumerate(topk):
                x = sample(features(m // 2, d, seed=1 + i), args.batch, seed=100 + i).to(dev)
                case = Case("topk", f"TopK d={d} m={m} k={k} B={args.batch}", {"d": d, "m": m, "k": k,
                                                                                  "rows": args.batch}, x)
                guarded(case, "sparsecode", lambda: sc_topk(d, m, k, x, dev, Path(tmp) / f"t{i}", args))  # noqa: B023
                guarded(case, "SAELens", lambda: saelens_topk(d, m, k, x, dev, args))  # noqa: B023
                guarded(case, "sparsify", lambda: sparsify_topk(d, m, k, x, dev, args))  # noqa: B023
                guarded(case, "plain", lambda: plain_topk(d, m, k, x, dev, args))  # noqa: B023
                cases.append(case)
                print(f"{case.label}: " + ", ".join(c.name for c in case.contenders), flush=True)
                rows += run_case(case, dev, args)
                if gpu:
                    floors[case.label] = measure_floor(d, m, args.batch, dev)
                case.contenders.clear()
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
        if args.only in ("all", "vq"):
            for i, (dim, K) in enumerate(vqs):
                x = sample(features(max(K // 4, 16), dim, seed=50 + i), args.vq_rows, seed=200 + i).to(dev)
                case = Case("vq", f"VQ dim={dim} K={K}", {"dim": dim, "K": K, "rows": args.vq_rows,
                                                          "rows_asked": args.vq_rows}, x, scalable=not gpu)
                guarded(case, "sparsecode", lambda: sc_vq(dim, K, x, dev, Path(tmp) / f"v{i}", args))  # noqa: B023
                guarded(case, "vector-quantize-pytorch", lambda: vqp_vq(dim, K, x, dev, args))  # noqa: B023
                cases.append(case)
                print(f"{case.label}: " + ", ".join(c.name for c in case.contenders), flush=True)
                case_rows = run_case(case, dev, args)
                for r in case_rows:
                    r["label"] = case.label = f"VQ dim={dim} K={K} N={case.sizes['rows']}"
                rows += case_rows
                case.contenders.clear()
                gc.collect()
    qual = None
    if args.quality_steps and args.only in ("all", "topk"):
        d, m, k = topk[0] if not gpu else (256, 4096, 32)
        print(f"quality check: TopK d={d} m={m} k={k}, {args.quality_steps} steps of {args.quality_batch}", flush=True)
        qual = quality(d, m, k, args.quality_batch, args.quality_steps, dev, args)
    goal_rows = goals(rows, qual, floors, gpu)
    for label, fl in floors.items():
        rows.append({"kind": "floor", "label": label, **fl})

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for rec in [meta, *rows, *([qual] if qual else []), *goal_rows]:
            f.write(json.dumps(rec) + "\n")
    text = markdown(meta, [r for r in rows if r["kind"] == "step"], cases, qual, goal_rows, floors)
    md.write_text(text)
    print("\n" + text)
    print(f"wrote {out} and {md}")


if __name__ == "__main__":
    main()
