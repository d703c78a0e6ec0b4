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

The harness is split by role: this file (flags, the suite, the files written), throughput_harness.py
(data, timing, the round-robin run of a case, the GPU floor), throughput_memory.py (step peak),
throughput_quality.py (the quality check), throughput_report.py (goals, the markdown table), and
contenders/, one module per contender, each with `build(sizes, x, dev, run, args) -> Contender`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import contenders
import torch
from throughput_harness import Case, features, guarded, measure_floor, run_case, sample
from throughput_quality import quality
from throughput_report import device_name, git_state, goals, markdown, versions

RESULTS = Path(__file__).resolve().parent / "results"
CPU_TOPK = [(256, 4096, 32), (512, 8192, 32)]  # (d, m, k)
GPU_TOPK = [(768, 24576, 32), (2304, 65536, 64)]
CPU_VQ = [(256, 1024), (256, 8192)]  # (dim, K)
GPU_VQ = [(256, 8192), (256, 65536)]


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
                for name, build in contenders.TOPK:
                    guarded(case, name, build, dev, Path(tmp) / f"t{i}", args)
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
                for name, build in contenders.VQ:
                    guarded(case, name, build, dev, Path(tmp) / f"v{i}", args)
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
