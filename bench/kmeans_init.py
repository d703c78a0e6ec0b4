"""k-means initialisation, old seeding against new (issue 14): seeding time and the k-means objective.

For each K the sample is the trainer's (`init_rows` = max(16384, 2K) rows, d = 384): real MiniLM activations
from a `sparsecode harvest` store when one is given (default runs/stores/minilm-full), else a synthetic
mixture of K unbalanced Gaussian clusters. Seedings:

  old  what sparsecode/vq/kmeans.py did before: sequential k-means++ (one pass over the sample per centre,
       the code below is the old function verbatim) up to K = 4,096, a random sample of rows above
  new  `sparsecode.vq.kmeans.seed`: D² sampling in rounds of ⌈chosen / GROWTH⌉ centres
  random  a random sample of rows (the old path above 4,096; a baseline at every K)

Objective: mean squared distance of a sample row to its nearest centre (exact, `min_d2`), after seeding and
after `--iters` Lloyd steps (`sparsecode.vq.kmeans.lloyd`, what `kmeans` runs).

    OMP_NUM_THREADS=1 .venv/bin/python bench/kmeans_init.py --sizes 1024,4096 --iters 10
    OMP_NUM_THREADS=1 .venv/bin/python bench/kmeans_init.py --sizes 65536 --iters 0 --only new,random
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from pathlib import Path

import torch
from throughput_report import device_name

from sparsecode.vq.kmeans import GROWTH, lloyd, min_d2, sample_rows, seed

STORE = Path(__file__).resolve().parent.parent / "runs" / "stores" / "minilm-full"
OLD_PLUSPLUS_MAX_K = 4096


@torch.no_grad()
def old_plusplus(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ (D² sampling) seeds: [k] row indices of x (the old sparsecode function, verbatim)."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    chosen = [first]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        p = d2.double().cpu()
        i = torch.multinomial(p / p.sum(), 1, generator=generator).item() if p.sum() > 0 else \
            torch.randint(n, (1,), generator=generator).item()
        chosen.append(i)
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(1))
    return torch.tensor(chosen, device=x.device)


def old_seed(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    return old_plusplus(x, k, g) if k <= OLD_PLUSPLUS_MAX_K and n > k else sample_rows(n, k, g).to(x.device)


def load(k: int, d: int, store: Path | None, dev: torch.device) -> tuple[torch.Tensor, str]:
    n = max(16384, 2 * k)
    if store is not None and (store / "manifest.json").exists():
        from sparsecode.data import SourceConfig, open_source

        src = open_source(SourceConfig(kind="store", path=str(store)), "train")
        x = src.next_batch(n).float()
        return x.to(dev), f"MiniLM store {store.name} ({x.shape[1]} dims)"
    g = torch.Generator().manual_seed(k)
    centres = 2 * torch.randn(k, d, generator=g)
    weights = torch.rand(k, generator=g) ** 4  # unbalanced cluster sizes
    label = torch.multinomial(weights, n, replacement=True, generator=g)
    return (centres[label] + torch.randn(n, d, generator=g)).to(dev), f"synthetic: {k} unbalanced clusters"


def objective(x: torch.Tensor, centres: torch.Tensor) -> float:
    xc = x - x.mean(0)
    return min_d2(xc, xc.pow(2).sum(1), centres - x.mean(0)).mean().item()


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,4096,16384,65536", help="K values, comma-separated")
    p.add_argument("--d", type=int, default=384, help="width of the synthetic data (a store has its own)")
    p.add_argument("--store", default=str(STORE), help="a harvest store ('' for synthetic clusters)")
    p.add_argument("--iters", type=int, default=10, help="Lloyd steps after seeding")
    p.add_argument("--only", default="old,new,random", help="seedings to run, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    seedings = {"old": old_seed, "new": seed, "random": lambda x, k, g: sample_rows(x.shape[0], k, g).to(x.device)}
    only = [s for s in args.only.split(",") if s]
    print(f"{dt.date.today()}, {device_name(dev)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load {' '.join(f'{v:.1f}' for v in os.getloadavg())}, GROWTH={GROWTH}")
    print("| K | rows | data | seeding | seed time (s) | objective after seeding | "
          f"after {args.iters} Lloyd steps | Lloyd time (s) |\n|---|---|---|---|---|---|---|---|", flush=True)
    for k in (int(v) for v in args.sizes.split(",")):
        x, what = load(k, args.d, Path(args.store) if args.store else None, dev)
        for s in only:
            if s == "old" and k > OLD_PLUSPLUS_MAX_K and "random" in only:
                continue  # the old path is the random sample: one row
            big = k > OLD_PLUSPLUS_MAX_K
            what_seed = {"old": "old (random)" if big else "old (k-means++)", "new": "new",
                         "random": "random (= old)" if big else "random"}[s]
            g = torch.Generator().manual_seed(args.seed)
            sync(dev)
            t0 = time.perf_counter()
            centres = x[seedings[s](x, k, g)].clone()
            sync(dev)
            t_seed = time.perf_counter() - t0
            o_seed = objective(x, centres)
            t0 = time.perf_counter()
            centres = lloyd(x, centres, args.iters)
            sync(dev)
            t_lloyd = time.perf_counter() - t0
            o_end = objective(x, centres) if args.iters else float("nan")
            print(f"| {k:,} | {x.shape[0]:,} | {what} | {what_seed} | {t_seed:.2f} | {o_seed:.3f} | {o_end:.3f} | "
                  f"{t_lloyd:.1f} |", flush=True)


if __name__ == "__main__":
    main()
