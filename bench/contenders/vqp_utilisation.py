"""vector-quantize-pytorch's VectorQuantize (EMA, k-means init, dead-code expiry) trained on a store as
bench/vq_utilisation.py trains sparsecode's codebooks: same split, init sample, batches, steps and held-out rows.

Runs in the peers' venv (.venv-bench, where sparsecode is importable for its data and its metrics); prints one
JSON line: utilisation, perplexity, FVU and churn (codes expired per step, second half) on held-out rows.

    .venv-bench/bin/python bench/contenders/vqp_utilisation.py --store runs/stores/minilm-full --heldout 0.25 \
        -K 1024 --steps 400 --eval-rows 32768
"""

from __future__ import annotations

import argparse
import json

import torch
from heldout import held_out_stats  # bench/contenders/heldout.py

from sparsecode.code import Code
from sparsecode.data.source import SourceConfig, open_source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--heldout", type=float, default=0.05)
    p.add_argument("-K", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--init-rows", type=int, default=16384)
    p.add_argument("--eval-rows", type=int, required=True)
    p.add_argument("--dead-code", type=float, default=2.0, help="threshold_ema_dead_code (its expiry)")
    p.add_argument("--kmeans-iters", type=int, default=10)
    a = p.parse_args()
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    cfg = SourceConfig(kind="store", path=a.store, heldout=a.heldout)
    train = open_source(cfg, "train")
    vq = VectorQuantize(dim=train.d, codebook_size=a.K, decay=0.99, commitment_weight=0.25, kmeans_init=True,
                        kmeans_iters=a.kmeans_iters, threshold_ema_dead_code=a.dead_code).train()
    vq(train.next_batch(a.init_rows).float()[None])  # its k-means runs on the first batch: give it our init sample
    book, replaced = vq._codebook, []
    replace = book.replace

    def counted(samples, batch_mask, **kw):  # its expiry calls replace() with the mask of the codes it moves
        replaced[-1] += int(batch_mask.sum())
        return replace(samples, batch_mask=batch_mask, **kw)

    book.replace = counted
    expired = []
    for step in range(a.steps):
        replaced.append(0)
        vq(train.next_batch(a.batch).float()[None])
        if step >= a.steps // 2:
            expired.append(replaced[-1])
    vq.eval()
    def forward(x):
        q, idx, _ = vq(x[None])
        return q[0], Code.ones(idx[0], a.K, x.dtype)

    stats = held_out_stats(cfg, a.K, a.eval_rows, forward)
    r = stats.result()
    print(json.dumps({"rows": stats.rows, "utilisation": r["utilisation"], "perplexity": r["perplexity"],
                      "fvu": r["fvu"], "churn": sum(expired) / max(len(expired), 1)}))


if __name__ == "__main__":
    main()
