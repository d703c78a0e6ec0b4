"""Codebook utilisation vs codebook size: plain vq, vq + remedies, simvq, frozen_projector, vqbridge, fsq.

Held-out utilisation (share of codes used), perplexity, FVU, time per step and churn (codes restarted per
step over the second half of training) on the clustered synthetic set. Each run sees `--rows-per-code`·K
training rows, so every size gets the same training per code. FSQ is counted over its implicit codes
(`code_ids`), with levels 4^n matched to K.

    .venv/bin/python bench/vq_utilisation.py [--sizes 1024 4096 16384 65536] [--rows-per-code 16] [--d 8]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from sparsecode.data.source import SourceConfig, open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, train

FSQ_LR = 3e-2  # fsq is two small linear maps: at 3e-3 it has not left its random start in 300 steps (FVU 0.64)


def methods(k: int, restart_after: float, kmeans_iters: int) -> dict[str, tuple[str, dict]]:
    return {
        "vq (no remedies)": ("vq", {"m": k, "init": "random", "restart_after": 0}),
        "vq (+restarts)": ("vq", {"m": k, "init": "random", "restart_after": restart_after}),
        "vq (+k-means, restarts)": ("vq", {"m": k, "kmeans_iters": kmeans_iters, "restart_after": restart_after}),
        "simvq": ("simvq", {"m": k}),
        "frozen_projector": ("frozen_projector", {"m": k, "kmeans_iters": kmeans_iters}),
        "vqbridge": ("vqbridge", {"m": k, "group": 16 if k <= 16384 else 64}),
        "fsq": ("fsq", {"levels": [4] * round(math.log(k, 4))}),  # trained at FSQ_LR
    }


def measure(name: str, method: str, coder: dict, k: int, args) -> dict:
    if args.store:  # real activations: a store written by `sparsecode harvest` (held-out split: its last 5%)
        source = SourceConfig(kind="store", path=str(args.store))
    else:
        source = SourceConfig(kind="clusters", options={"d": args.d, "n_clusters": args.clusters,
                                                        "spread": args.spread})
    steps = max(args.min_steps, math.ceil(args.rows_per_code * k / args.batch))
    cfg = TrainConfig(method=method, coder=coder, source=source, steps=steps, batch_size=args.batch,
                      lr=FSQ_LR if method == "fsq" else args.lr, warmup_steps=args.warmup, min_lr_ratio=0.01,
                      log_every=1, ckpt_every=10**9, init_rows=max(16384, 2 * k))
    with tempfile.TemporaryDirectory() as d:
        coder_ = train(cfg, Path(d))
        log = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    rows = args.eval_per_code * k
    result = evaluate(coder_, open_source(source, "eval"), rows=rows)
    if "implicit_utilisation" in result:  # fsq: usage of its implicit codes, counted by evaluate
        result.update(utilisation=result["implicit_utilisation"], perplexity=result["implicit_perplexity"])
    after = [r for r in log if r["step"] > args.warmup]
    second_half = [r for r in log if r["step"] > steps // 2]
    return {"method": name, "K": k, "eval_rows": result["rows"], "utilisation": result["utilisation"],
            "perplexity": result["perplexity"], "fvu": result["fvu"],
            "ms_per_step": sum(1000 * args.batch / r["tokens_per_s"] for r in after) / max(len(after), 1),
            "churn": sum(r.get("restarts", 0.0) for r in second_half) / max(len(second_half), 1), "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--methods", nargs="*", default=None, help="subset of the method names")
    p.add_argument("--rows-per-code", type=float, default=16, help="training rows per code (sets the steps)")
    p.add_argument("--min-steps", type=int, default=300)
    p.add_argument("--restart-after", type=float, default=8.0, help="vq's restart_after (expected hits)")
    p.add_argument("--kmeans-iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--eval-per-code", type=int, default=8, help="held-out rows per code")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--store", type=Path, default=None, help="a harvested store instead of the clustered set")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| method | K | steps | utilisation | perplexity | FVU | ms/step | churn (restarts/step, 2nd half) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in args.sizes:
        for name, (method, coder) in methods(k, args.restart_after, args.kmeans_iters).items():
            if args.methods and name not in args.methods and method not in args.methods:
                continue
            r = measure(name, method, coder, k, args)
            print(f"| {r['method']} | {k} | {r['steps']} | {r['utilisation']:.1%} | {r['perplexity']:.0f} | "
                  f"{r['fvu']:.4f} | {r['ms_per_step']:.0f} | {r['churn']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
