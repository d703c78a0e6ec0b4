"""Small trained runs of every method another library can hold, on a correlated 16-d set with an offset (so
that b_dec matters), for the interop tests with and without the other libraries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sparsecode.data.source import SourceConfig
from sparsecode.train import TrainConfig, train

D, M = 16, 64
METHODS = {"topk": {"k": 4}, "relu": {"l1_coef": 0.05}, "jumprelu": {"theta_init": 0.05},
           "batchtopk": {"k": 4, "calibration_rows": 1024}, "matryoshka": {"k": 4, "calibration_rows": 1024},
           "mp": {"k": 4}}
# what each format holds, by the mapping
HOLDS = {"saelens": ["topk", "relu", "jumprelu", "batchtopk", "matryoshka", "mp"], "sparsify": ["topk"],
         "dictionary_learning": ["topk", "relu", "jumprelu", "batchtopk", "matryoshka"]}
PAIRS = [(fmt, method) for fmt, methods in HOLDS.items() for method in methods]
# transcoders (name: method, options, d_out, skip) on a sparse map of 16-d inputs; sparsify's have d_out = d_in
TRANSCODERS = {"relu_tc": ("relu", {"l1_coef": 0.05}, 12, False), "relu_skip": ("relu", {"l1_coef": 0.05}, 12, True),
               "jumprelu_tc": ("jumprelu", {"theta_init": 0.05}, 12, False),
               "jumprelu_skip": ("jumprelu", {"theta_init": 0.05}, 12, True),
               "batchtopk_skip": ("batchtopk", {"k": 4, "calibration_rows": 1024}, 12, True),
               "topk_tc": ("topk", {"k": 4}, D, False), "topk_skip": ("topk", {"k": 4}, D, True)}
TC_HOLDS = {"saelens": ["relu_tc", "relu_skip", "jumprelu_tc", "jumprelu_skip", "batchtopk_skip"],
            "sparsify": ["topk_tc", "topk_skip"]}
TC_PAIRS = [(fmt, name) for fmt, names in TC_HOLDS.items() for name in names]


def activations(rows: int = 8192, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, D, generator=g) @ torch.randn(D, D, generator=g) + 3 * torch.randn(D, generator=g)
    return x.numpy().astype(np.float32)


def make_runs(root: Path) -> dict[str, Path]:
    """{method: run folder}: 60 steps each on activations(), a tenth held out."""
    np.save(root / "x.npy", activations())
    runs = {}
    for method, opts in METHODS.items():
        runs[method] = root / method
        src = SourceConfig(kind="npy", path=str(root / "x.npy"), heldout=0.1)
        train(TrainConfig(method=method, coder={"m": M, **opts}, source=src, steps=60, batch_size=256, lr=3e-3,
                          log_every=30), runs[method])
    return runs


def map_source(d_out: int) -> SourceConfig:
    """A sparse map of 16-d inputs to `d_out`-d targets with a dense part (so a skip path learns something)."""
    return SourceConfig(kind="sparse_map", options={"d": D, "d_out": d_out, "n_features": 32, "dense": 0.5})


def make_transcoders(root: Path, names=tuple(TRANSCODERS)) -> dict[str, Path]:
    """{name: run folder} of TRANSCODERS: 60 steps each on a sparse map (its held-out stream for checks)."""
    runs = {}
    for name in names:
        method, opts, d_out, skip = TRANSCODERS[name]
        runs[name] = root / name
        train(TrainConfig(method=method, coder={"m": M, "skip": skip, **opts}, source=map_source(d_out), steps=60,
                          batch_size=256, lr=3e-3, log_every=30), runs[name])
    return runs
