import pytest
import torch

from sparsecode.data.source import SourceConfig
from sparsecode.train import TrainConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def topk_config(**kw) -> TrainConfig:
    """A small TopK run on the superposition set (d=64, 256 true features, 3 active on average)."""
    base = dict(method="topk", coder={"m": 512, "k": 6, "dead_tokens": 100_000},
                source=SourceConfig(kind="synthetic", options={"d": 64, "n_features": 256, "active": 3}),
                steps=1200, batch_size=1024, lr=2e-3, log_every=100)
    base.update(kw)
    return TrainConfig(**base)


def vq_config(**kw) -> TrainConfig:
    """A small VQ run on a 256-cluster mixture in 64 dims."""
    coder = {"m": 256, **kw.pop("coder", {})}
    base = dict(method="vq", coder=coder,
                source=SourceConfig(kind="clusters", options={"d": 64, "n_clusters": 256}),
                steps=300, batch_size=1024, log_every=50, init_rows=8192)
    base.update(kw)
    return TrainConfig(**base)
