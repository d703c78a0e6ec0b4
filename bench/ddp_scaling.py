"""Data-parallel scaling: tokens/s of `sparsecode train` (topk) on a store with 1 rank vs N ranks under torchrun.

Each setting is one `torchrun --nproc-per-node N -m sparsecode train ...` (gloo on the CPU, nccl on GPUs), the CPU
threads split evenly over the ranks (--threads in all; OMP_NUM_THREADS = threads / N), and its figure is the
median tokens/s of the trainer's logged windows after the first (the warm-up). Prints a markdown table.

    .venv/bin/python bench/ddp_scaling.py --store runs/stores/minilm-h --ranks 1 2 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(store: Path, ranks: int, a: argparse.Namespace, out: Path) -> dict:
    threads = max(1, a.threads // ranks)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "sparsecode", "train", "--method", "topk", "--source", str(store), "-m", str(a.m), "-k", str(a.k),
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--log-every", str(a.log_every),
           "--ckpt-every", str(10 * a.steps),
           "--device", a.device, "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        errors = [ln for ln in done.stderr.splitlines() if "error" in ln.lower()] or [f"exit {done.returncode}"]
        sys.exit(f"ranks={ranks}: {errors[0]}")
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in logs[1:]] or [logs[-1]["tokens_per_s"]]
    return {"ranks": ranks, "threads": threads, "tokens_per_s": statistics.median(rates), "fvu": logs[-1]["fvu"],
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(ROOT / "runs" / "stores" / "minilm-h"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all, split over ranks")
    p.add_argument("-m", type=int, default=4096)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    store = Path(a.store)
    if not (store / "manifest.json").is_file():
        sys.exit(f"no store at {store} (harvest one, or pass --store)")
    d = json.loads((store / "manifest.json").read_text())["d"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, ranks in enumerate(a.ranks):  # a setting given twice is measured twice
            rows.append(run(store, ranks, a, Path(tmp) / f"{i}-r{ranks}"))
    base = rows[0]["tokens_per_s"]
    print(f"topk d={d} m={a.m} k={a.k}, batch {a.batch_size} (split over the ranks), {a.steps} steps, "
          f"device {a.device}, {a.threads} threads in all\n")
    print("| ranks | threads/rank | tokens/s | × 1st row | final fvu | wall s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['ranks']} | {r['threads']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f} | "
              f"{r['fvu']:.4f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
