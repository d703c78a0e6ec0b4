"""The error-optimal reference for codebook use: k-means (sparsecode.vq.kmeans) fitted to a store's training rows,
then its held-out use and FVU, as bench/vq_utilisation.py measures the trained codebooks.

    OMP_NUM_THREADS=1 .venv/bin/python bench/kmeans_heldout.py --store runs/stores/minilm-h -K 16384 --iters 5 \
        --rows 450000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sparsecode.data.source import SourceConfig, open_source
from sparsecode.vq.kmeans import assign, kmeans


def rows_of(source: SourceConfig, split: str, n: int) -> torch.Tensor:
    reader = open_source(source, split)
    return torch.cat([reader.next_batch(min(65536, n - i)).float() for i in range(0, n, 65536)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--heldout", type=float, default=0.25)
    p.add_argument("-K", type=int, required=True)
    p.add_argument("--iters", type=int, default=10, help="Lloyd steps after the D² seeding")
    p.add_argument("--rows", type=int, default=0, help="training rows fitted (0: the whole training split)")
    p.add_argument("--eval-per-code", type=int, default=16, help="held-out rows per code")
    a = p.parse_args()
    source = SourceConfig(kind="store", path=a.store, heldout=a.heldout)
    n = len(open_source(source, "train").rows)
    x = rows_of(source, "train", min(a.rows or n, n))
    start = time.perf_counter()
    centres = kmeans(x, a.K, a.iters, "l2", torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    e = rows_of(source, "eval", a.eval_per_code * a.K)
    idx = assign(e, centres)
    fvu = float((e - centres[idx]).pow(2).sum() / (e - e.mean(0)).pow(2).sum())
    used = lambda i: float((torch.bincount(i, minlength=a.K) > 0).float().mean())  # noqa: E731
    print(json.dumps({"K": a.K, "iters": a.iters, "train_rows": x.shape[0], "kmeans_s": round(seconds),
                      "train_used": used(assign(x, centres)), "heldout_used": used(idx), "heldout_fvu": fvu}))


if __name__ == "__main__":
    main()
