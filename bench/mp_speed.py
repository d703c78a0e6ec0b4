"""Matching-pursuit SAE training step: sparsecode `mp` against SAELens `matching_pursuit`, side by side (issue 14).

One full training step each (forward through k pursuit steps, FVU/MSE, backward, optimizer) on the same
device, sizes and fixed batch, in one process, with bench/throughput.py's harness: contenders interleaved
round-robin, medians of the timed steps, and sparsecode's speed-up as the median over rounds of per-round
paired ratios. SAELens is held to exactly k pursuit steps (`max_iterations=k`, no early stop), the work
sparsecode's `mp` does; see bench/contenders/saelens_mp.py. Needs .venv-bench (SAELens is installed there).

    OMP_NUM_THREADS=1 .venv-bench/bin/python bench/mp_speed.py                     # d=384 m=4096 k=32, B=1024
    OMP_NUM_THREADS=1 .venv-bench/bin/python bench/mp_speed.py --sizes 384x4096x32,768x16384x32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from contenders import saelens_mp, sparsecode_mp
from throughput import parse_opt, parse_sizes
from throughput_harness import Case, features, guarded, run_case, sample
from throughput_report import device_name, git_state, versions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="384x4096x32,768x16384x32", help="d x m x k, comma-separated")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--mp-opt", action="append", default=[], metavar="KEY=VALUE", help="an MPConfig option")
    p.add_argument("--train-opt", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig option")
    p.add_argument("--out", type=Path, help="also write the rows as JSON lines")
    args = p.parse_args()
    args.mp_opt = dict(parse_opt(o) for o in args.mp_opt)
    args.train_opt = dict(parse_opt(o) for o in args.train_opt)
    args.max_step_s = float("inf")
    warnings.filterwarnings("ignore")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    print(f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}, {device_name(dev)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {' '.join(f'{v:.1f}' for v in os.getloadavg())}, "
          f"{versions()}, git {git_state()}", flush=True)
    print("command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]), flush=True)
    rows, table = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (d, m, k) in enumerate(parse_sizes(args.sizes, 3)):
            x = sample(features(m // 2, d, seed=1 + i), args.batch, seed=100 + i).to(dev)
            case = Case("mp", f"MP d={d} m={m} k={k} B={args.batch}", {"d": d, "m": m, "k": k, "rows": args.batch}, x)
            for name, build in [("sparsecode", sparsecode_mp.build), ("SAELens", saelens_mp.build)]:
                guarded(case, name, build, dev, Path(tmp) / f"mp{i}", args)
            for name, why in case.skipped.items():
                print(f"  skipped {name}: {why}", flush=True)
            print(case.label + ": " + ", ".join(c.name for c in case.contenders), flush=True)
            case_rows = run_case(case, dev, args)
            rows += case_rows
            ours = next((r for r in case_rows if r["lib"] == "sparsecode"), None)
            for r in case_rows:
                ratio, peak = r.get("sparsecode_speedup"), r["step_peak_mib"]
                table.append(f"| {case.label} | {r['contender']} | {r['step_ms']:.0f} | {r['rows_per_s']:,.0f} | "
                             f"{'n/a' if peak is None else f'{peak:.0f}'} | {f'{ratio:.2f}×' if ratio else '—'} |")
            if ours is None:
                print("  sparsecode did not build", flush=True)
    print("\n| case | contender | step (ms, median) | rows/s | step peak (MiB) | sparsecode speed-up |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
