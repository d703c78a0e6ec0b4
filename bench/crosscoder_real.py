"""A TopK crosscoder of two MiniLM layers (issue 18) on the stdlib corpus: per-site FVU and decoder-norm shares.

    .venv/bin/python bench/crosscoder_real.py --tokens 100000 --steps 200 -m 2048 -k 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsecode.data.harvest import HarvestConfig, harvest
from sparsecode.data.source import SourceConfig
from sparsecode.evaluate import evaluate_run
from sparsecode.train import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hooks", nargs="+", default=["encoder.layer.2", "encoder.layer.3"])
    p.add_argument("--store", type=Path, default=Path("runs/stores/minilm-l2l3"))
    p.add_argument("--out", type=Path, default=Path("runs/bench-crosscoder"))
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--heldout", type=float, default=0.1)
    p.add_argument("-m", type=int, default=2048)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()
    if not (a.store / "manifest.json").is_file():
        harvest(HarvestConfig(out=str(a.store), model="minilm", corpus="stdlib", tokens=a.tokens, device="cpu",
                              hooks=a.hooks))
    src = SourceConfig(kind="store", path=str(a.store.resolve()), heldout=a.heldout)
    train(TrainConfig(method="topk", coder={"m": a.m, "k": a.k}, steps=a.steps, batch_size=a.batch, lr=a.lr,
                      device="cpu", source=src, log_every=50, ckpt_every=a.steps), a.out)
    r = evaluate_run(a.out, rows=32768, splice_contexts=0)
    print(f"crosscoder of {' + '.join(a.hooks)}: FVU {r['fvu']:.4f}, L0 {r['l0']:.1f}, never fired "
          f"{r['never_fired']:.2%}, per site {r['sites']}")


if __name__ == "__main__":
    main()
