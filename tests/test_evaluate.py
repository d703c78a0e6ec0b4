"""evaluate: InfoMEC of the codes against the true factors, for sources that have them (synthetic features)."""

import tempfile
from pathlib import Path

import pytest
import torch
from sae_helpers import one_thread

from sparsecode.coder import build
from sparsecode.data.source import SourceConfig, TensorSource, open_source
from sparsecode.diagnose.infomec import _discretise, code_infomec, infomec
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, train

# 8 features in 16 dims (no superposition): a short TopK run recovers them all
FEATURES = SourceConfig(kind="synthetic", options={"d": 16, "n_features": 8, "active": 2})


@pytest.fixture(scope="module")
def trained_and_untrained():
    cfg = TrainConfig(method="topk", coder={"m": 16, "k": 3}, source=FEATURES, steps=600, batch_size=256, lr=4e-3,
                      warmup_steps=20, log_every=600, ckpt_every=600)
    with tempfile.TemporaryDirectory() as d, one_thread():
        trained = train(cfg, Path(d))
        torch.manual_seed(0)
        untrained = build("topk", {"d_in": 16, "m": 16, "k": 3})
        yield [evaluate(c, open_source(FEATURES, "eval"), rows=2048) for c in (trained, untrained)]


def test_trained_codes_are_more_disentangled_than_untrained_ones(trained_and_untrained):
    trained, untrained = trained_and_untrained
    assert trained["recovered"] == 1.0 and untrained["recovered"] == 0.0  # the runs are what the test assumes
    t, u = trained["infomec"], untrained["infomec"]
    assert t["factors"] == u["factors"] == 8 and t["rows"] == 2048
    for key in ("infom", "infoe", "infoc"):
        assert 0.0 <= u[key] < t[key] - 0.1 and t[key] <= 1.0, (key, t, u)


def test_sources_without_factors_report_no_infomec():
    coder = build("topk", {"d_in": 16, "m": 32, "k": 2})
    clusters = open_source(SourceConfig(kind="clusters", options={"d": 16, "n_clusters": 8}), "eval")
    assert "recovered" in (with_truth := evaluate(coder, clusters, rows=512)) and "infomec" not in with_truth
    assert "infomec" not in evaluate(coder, TensorSource(torch.randn(512, 16)), rows=512)
    assert "infomec" not in evaluate(coder, open_source(FEATURES, "eval"), rows=512, details=False)


def test_unused_atoms_change_no_figure():
    """code_infomec scores only the atoms the rows use: the same figures as the whole dense code."""
    src = open_source(FEATURES, "eval")
    x, factors = src.factored_batch(1024)
    code = build("topk", {"d_in": 16, "m": 64, "k": 2}).encode(x)
    dense = code.to_dense()
    assert (dense == 0).all(0).any()  # some atoms never fire on these rows
    short = code_infomec(code, factors)  # all 8 factors (the order of factors changes no figure)
    full = infomec(torch.stack([_discretise(c, 20) for c in factors.t()], 1), dense, discrete=False)
    assert short["latents"] == int(dense.ne(0).any(0).sum()) < dense.shape[1]
    for key in ("infom", "infoe", "infoc"):
        assert short[key] == pytest.approx(full[key], abs=1e-9), key

