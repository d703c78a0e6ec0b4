"""Small training runs shared by the sparse-dictionary tests: train, evaluate, reload and compare."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import sparsecode.data.hierarchical  # noqa: F401  (registers "hierarchical" until open_source imports it)
from sparsecode.checkpoint import load_coder
from sparsecode.coder import Coder
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, train

# d=32, 64 true features, 2 active on average: small enough for seconds on a shared CPU
SUPERPOSITION = {"d": 32, "n_features": 64, "active": 2}


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny matrices on a shared CPU: one intra-op thread avoids oversubscription (10× faster here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(method: str, coder: dict[str, Any], source: dict[str, Any] | None = None, kind: str = "synthetic",
        steps: int = 600, batch_size: int = 512, lr: float = 4e-3, eval_rows: int = 4096,
        check_reload: bool = True) -> tuple[Coder, dict[str, Any]]:
    """Train `method` briefly, evaluate it on held-out rows and check save → load → identical encode."""
    src = SourceConfig(kind=kind, options=source or SUPERPOSITION)
    cfg = TrainConfig(method=method, coder={"m": 128, "dead_tokens": 20_000, **coder}, source=src, steps=steps,
                      batch_size=batch_size, lr=lr, warmup_steps=20, log_every=100, ckpt_every=steps)
    with tempfile.TemporaryDirectory() as d, one_thread():
        coder_ = train(cfg, Path(d))
        result = evaluate(coder_, open_source(src, "eval"), rows=eval_rows)
        if check_reload:
            assert_same_encode(coder_, load_coder(Path(d)), open_source(src, "eval").next_batch(256))
    return coder_, result


def assert_same_encode(a: Coder, b: Coder, x: torch.Tensor) -> None:
    """Two coders give bit-identical codes on `x`."""
    ca, cb = a.encode(x), b.encode(x)
    assert torch.equal(ca.indices, cb.indices) and torch.equal(ca.values, cb.values)


def assert_resumes_exactly(cfg: TrainConfig, root: Path, stop: int) -> Coder:
    """Train `cfg` straight into root/a, and into root/b stopped at step `stop` then resumed: identical states."""
    import dataclasses

    straight = train(cfg, root / "a")
    train(dataclasses.replace(cfg, steps=stop), root / "b")
    resumed = train(cfg, root / "b", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    return resumed
