"""Class-incremental learning through a discrete key–value bottleneck vs a fine-tuned linear head.

sklearn's bundled digits (8×8, 10 classes) through a frozen random ReLU feature encoder; the training
stream shows class 0's images, then class 1's, ... (no task boundaries, one pass); both learners use
plain SGD on cross-entropy. Final accuracy on held-out images of all classes, and on the first nine.
Needs scikit-learn (for the bundled data only).

    .venv/bin/python bench/kv_incremental.py [--width 256] [--heads 16] [--keys 64] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sparsecode.coder import build


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def accuracy(f, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (f(x).argmax(1) == y).float().mean().item()


def run(seed: int, args) -> dict[str, float]:
    xtr, ytr, xte, yte = digits(seed)
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(64, args.width, generator=g) / 8, torch.randn(args.width, generator=g) * 0.1
    encode = lambda x: F.relu(x @ w + b)  # noqa: E731  (the frozen encoder)
    ftr, fte = encode(xtr), encode(xte)
    torch.manual_seed(seed)
    kv = build("kvbottleneck", {"d_in": args.width, "m": args.heads * args.keys, "heads": args.heads,
                                "head_dim": args.head_dim, "d_value": 10})
    kv.generator = g
    kv.init_from_data(ftr)  # keys from the unlabelled training images, then frozen
    head = torch.nn.Linear(args.width, 10)
    learners = [(torch.optim.SGD([kv.values], lr=args.lr_kv), kv.logits),
                (torch.optim.SGD(head.parameters(), lr=args.lr_head), head)]
    for label in range(10):
        rows = ftr[ytr == label]
        for start in range(0, len(rows), args.batch):
            x = rows[start : start + args.batch]
            y = torch.full((x.shape[0],), label)
            for opt, f in learners:
                opt.zero_grad()
                F.cross_entropy(f(x), y).backward()
                opt.step()
    old = yte < 9
    return {"kv": accuracy(kv.logits, fte, yte), "head": accuracy(head, fte, yte),
            "kv_old": accuracy(kv.logits, fte[old], yte[old]), "head_old": accuracy(head, fte[old], yte[old])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--keys", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr-kv", type=float, default=1.0)
    p.add_argument("--lr-head", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    print("| seed | kv bottleneck: all classes | linear head: all classes | kv: classes 0–8 | head: classes 0–8 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for seed in args.seeds:
        r = run(seed, args)
        print(f"| {seed} | {r['kv']:.1%} | {r['head']:.1%} | {r['kv_old']:.1%} | {r['head_old']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
