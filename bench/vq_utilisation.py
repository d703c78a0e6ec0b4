"""Codebook utilisation vs codebook size: plain vq, vq + remedies, simvq, frozen_projector, vqbridge, fsq.

Held-out utilisation (share of codes used), perplexity, FVU, time per step and churn (codes restarted per
step over the second half of training) on the clustered synthetic set, or on real activations (`--store`),
where vector-quantize-pytorch runs beside them on the same rows (bench/contenders/vqp_utilisation.py, in
.venv-bench). Each run sees `--rows-per-code`·K training rows, so every size gets the same training per code.
FSQ is counted over its implicit codes (`code_ids`), with levels 4^n matched to K.

    .venv/bin/python bench/vq_utilisation.py [--sizes 1024 4096 16384 65536] [--rows-per-code 16] [--d 8]
    .venv/bin/python bench/vq_utilisation.py --store runs/stores/minilm-h --heldout 0.25 --eval-per-code 32
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
from pathlib import Path

import torch

from sparsecode.coder import auto_init_rows
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, train
from sparsecode.vq.base import KMEANS_ROWS_PER_CODE

PEER_DISTANCES = 2**30  # the peer's k-means holds an init rows × K distance matrix (and its copies): 4 GiB at most
FSQ_LR = 3e-2  # fsq is two small linear maps: at 3e-3 it has not left its random start in 300 steps (FVU 0.64)


def methods(k: int, kmeans_iters: int | None) -> dict[str, tuple[str, dict]]:
    """The rows of the table: each method at its defaults, and the papers' variants (or our older defaults)."""
    km = {} if kmeans_iters is None else {"kmeans_iters": kmeans_iters}
    bridge = {"m": k, "group": 16 if k <= 16384 else 64}
    return {
        "vq (no remedies)": ("vq", {"m": k, "init": "random", "restart_after": 0}),
        "vq (k-means, restarts onto rows ∝ error, every 8)": ("vq", {"m": k, **km, "restart_to": "error",
                                                                     "restart_after": 8}),
        "vq": ("vq", {"m": k, **km}),
        "simvq (paper: random basis, no restarts)": ("simvq", {"m": k, "init": "random", "restart_after": 0,
                                                               "refine": 0.0}),
        "simvq": ("simvq", {"m": k, **km}),
        "frozen_projector (paper: no restarts)": ("frozen_projector", {"m": k, **km, "restart_after": 0,
                                                                         "refine": 0.0}),
        "frozen_projector": ("frozen_projector", {"m": k, **km}),
        "vqbridge (paper: zero start, no restarts)": ("vqbridge", {**bridge, "init": "zero", "restart_after": 0,
                                                                    "refine": 0.0}),
        "vqbridge": ("vqbridge", {**bridge, **km}),
        "fsq": ("fsq", {"levels": [4] * round(math.log(k, 4))}),  # trained at FSQ_LR
    }


def steps_for(k: int, args) -> int:
    return max(args.min_steps, math.ceil(args.rows_per_code * k / args.batch))


def init_rows(k: int, args) -> int:
    """The init sample our k-means codebooks take by default at K (init_rows unset), handed to the peer as well."""
    d = open_source(SourceConfig(kind="store", path=str(args.store), heldout=args.heldout), "train").d
    return auto_init_rows(KMEANS_ROWS_PER_CODE, k, d)


def peer(k: int, dead_code: float, args) -> dict:
    """vector-quantize-pytorch on the same split, init sample (at most PEER_DISTANCES / K rows of it), batches, steps
    and held-out rows (its venv)."""
    cmd = [str(args.peer_python), str(Path(__file__).parent / "contenders" / "vqp_utilisation.py"),
           "--store", str(args.store), "--heldout", str(args.heldout), "-K", str(k), "--steps", str(steps_for(k, args)),
           "--batch", str(args.batch), "--init-rows", str(min(init_rows(k, args), PEER_DISTANCES // k)), "--eval-rows",
           str(args.eval_per_code * k), "--dead-code", str(dead_code)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    return {"method": f"vector-quantize-pytorch (k-means, expiry below {dead_code:g})", "K": k, "ms_per_step": None,
            "steps": steps_for(k, args), **r}


def measure(name: str, method: str, coder: dict, k: int, args) -> dict:
    if args.store:  # real activations: a store written by `sparsecode harvest` (held-out split: its last 5%)
        source = SourceConfig(kind="store", path=str(args.store), heldout=args.heldout)
    else:
        source = SourceConfig(kind="clusters", options={"d": args.d, "n_clusters": args.clusters,
                                                        "spread": args.spread})
    steps = steps_for(k, args)
    cfg = TrainConfig(method=method, coder=coder, source=source, steps=steps, batch_size=args.batch,
                      lr=FSQ_LR if method == "fsq" else args.lr, warmup_steps=args.warmup, min_lr_ratio=0.01,
                      log_every=1, ckpt_every=10**9, init_rows=None if args.store else max(16384, 2 * k))
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
    p.add_argument("--methods", nargs="*", default=None,
                   help="subset of the rows, by name (a method's name is its default row; vqp: the peer)")
    p.add_argument("--rows-per-code", type=float, default=16, help="training rows per code (sets the steps)")
    p.add_argument("--min-steps", type=int, default=300)
    p.add_argument("--kmeans-iters", type=int, default=None, help="default: each method's own")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d", type=int, default=8)
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--spread", type=float, default=0.5)
    p.add_argument("--eval-per-code", type=int, default=8, help="held-out rows per code")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--store", type=Path, default=None, help="a harvested store instead of the clustered set")
    p.add_argument("--heldout", type=float, default=0.05, help="the store's held-out share")
    p.add_argument("--peer-python", type=Path, default=Path(".venv-bench/bin/python"),
                   help="the venv with vector-quantize-pytorch (store runs only)")
    p.add_argument("--peer-dead-code", type=float, nargs="*", default=[2.0],
                   help="its threshold_ema_dead_code values to run (0 = expiry off)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| method | K | steps | utilisation | perplexity | FVU | ms/step | churn (restarts/step, 2nd half) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in args.sizes:
        rows = [(name, method, coder) for name, (method, coder) in methods(k, args.kmeans_iters).items()
                if not args.methods or name in args.methods]
        if args.store and args.peer_python.exists() and (not args.methods or "vqp" in args.methods):
            rows += [(None, dead, None) for dead in args.peer_dead_code]
        for name, method, coder in rows:
            r = measure(name, method, coder, k, args) if name else peer(k, method, args)
            print(f"| {r['method']} | {k} | {r['steps']} | {r['utilisation']:.1%} | {r['perplexity']:.0f} | "
                  f"{r['fvu']:.4f} | {'–' if r['ms_per_step'] is None else round(r['ms_per_step'])} | "
                  f"{r['churn']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
