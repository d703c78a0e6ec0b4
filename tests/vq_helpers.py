"""Shared helpers of the codebook tests: train a small run, evaluate it, reload it and compare codes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from sparsecode.checkpoint import load_coder
from sparsecode.coder import Coder
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, train


def clusters(d: int = 32, n_clusters: int = 256, spread: float = 0.1) -> SourceConfig:
    return SourceConfig(kind="clusters", options={"d": d, "n_clusters": n_clusters, "spread": spread})


def run(method: str, coder: dict[str, Any], source: SourceConfig, rows: int = 16384,
        **train_kw: Any) -> tuple[Coder, dict[str, Any]]:
    """Train into a temporary run, check that the reloaded checkpoint gives identical codes, evaluate."""
    base = dict(steps=100, batch_size=1024, log_every=50, ckpt_every=10**6, init_rows=8192)
    cfg = TrainConfig(method=method, coder=coder, source=source, **{**base, **train_kw})
    with tempfile.TemporaryDirectory() as d:
        trained = train(cfg, Path(d))
        assert_same_codes(trained, load_coder(Path(d)), open_source(source, "eval").next_batch(512))
    return trained, evaluate(trained, open_source(source, "eval"), rows=rows)


def assert_same_codes(a: Coder, b: Coder, x: torch.Tensor) -> None:
    a.eval()
    ca, cb = a.encode(x), b.encode(x)
    assert torch.equal(ca.indices, cb.indices)
    assert torch.equal(ca.values, cb.values)
    torch.testing.assert_close(a.decode(ca), b.decode(cb))
