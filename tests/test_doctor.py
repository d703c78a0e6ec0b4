"""The collapse doctor: each cause is named, with its figure and fix, on a run built to show it, and not on
the same run without the fault."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sae_helpers import one_thread

from sparsecode.cli import main
from sparsecode.data.source import SourceConfig
from sparsecode.evaluate import diagnose_run
from sparsecode.train import TrainConfig, train

FEATURES = SourceConfig(kind="synthetic", options={"d": 32, "n_features": 64, "active": 2})
CLUSTERS = SourceConfig(kind="clusters", options={"d": 16, "n_clusters": 64})


def causes(tmp_path, name: str, **kw) -> list[str]:
    base = dict(method="topk", coder={"m": 128, "k": 4, "dead_tokens": 5000}, source=FEATURES, steps=150,
                batch_size=256, lr=2e-3, log_every=10)
    with one_thread():
        train(TrainConfig(**{**base, **kw}), tmp_path / name)
        return [f.cause for f in diagnose_run(tmp_path / name)]


def test_a_dead_window_longer_than_the_run(tmp_path):
    coder = {"m": 512, "k": 4}
    assert any("dead window is longer than the run" in c
               for c in causes(tmp_path, "long", coder={**coder, "dead_tokens": 1_000_000}, lr=1e-2))
    assert not any("dead window" in c for c in causes(tmp_path, "short", coder={**coder, "dead_tokens": 2000}, lr=1e-2))


def test_restarts_that_never_settle(tmp_path):
    vq = dict(method="vq", source=CLUSTERS, steps=60, lr=1e-3)
    assert "codes keep being moved after half the run" in causes(
        tmp_path, "churn", coder={"m": 64, "init": "random", "restart_after": 0.01}, **vq)
    # 32 rows per code in a batch of 2,048: a code unused for restart_after·m = 512 rows is the rare exception
    calm = causes(tmp_path, "calm", coder={"m": 64}, batch_size=2048, **vq)
    assert "codes keep being moved after half the run" not in calm


def test_codes_at_another_scale_and_a_dominant_dimension(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(32, 8))
    rows = centres[rng.integers(0, 32, 20000)] + 0.05 * rng.normal(size=(20000, 8))
    np.save(tmp_path / "far.npy", (rows * 100).astype(np.float32))
    wide = rows.copy()
    wide[:, 0] *= 30
    np.save(tmp_path / "wide.npy", wide.astype(np.float32))
    vq = dict(method="vq", steps=40, coder={"m": 64, "init": "random", "restart_after": 0})
    far = causes(tmp_path, "far", source=SourceConfig(kind="npy", path=str(tmp_path / "far.npy")), **vq)
    assert any("another scale than the data" in c for c in far)
    wide_causes = causes(tmp_path, "wide", source=SourceConfig(kind="npy", path=str(tmp_path / "wide.npy")), **vq)
    assert any("one dimension holds most of the variance" in c for c in wide_causes)
    assert not any("one dimension" in c for c in far)


@pytest.mark.parametrize("lr, cause", [(0.5, "the learning rate is too high"),
                                       (1e-8, "the learning rate is too low (or nothing trains)")])
def test_the_learning_rate_judged_from_the_curve(tmp_path, lr, cause):
    assert cause in causes(tmp_path, "lr", lr=lr, decay="constant", warmup_steps=0)
    assert not any("learning rate" in c for c in causes(tmp_path, "good", lr=2e-3))


def test_the_command_prints_cause_figure_and_fix(tmp_path, capsys):
    args = ["train", "-m", "512", "-k", "4", "--source-opt", "d=32", "--source-opt", "n_features=64",
            "--steps", "100", "--batch-size", "256", "--lr", "0.01", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["diagnose", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "unused atoms:" in out and "cause: the dead window is longer than the run" in out
    assert "fix: --set dead_tokens=1280" in out
    assert main(["diagnose", str(tmp_path / "r"), "--json"]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert {"what", "cause", "figure", "fix"} <= set(findings[0])
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2
    torch.set_num_threads(torch.get_num_threads())


def test_an_inference_threshold_off_its_l0_target(tmp_path):
    """A batchtopk run whose threshold is set to give L0 = k on the held-out rows is healthy; halving it is not."""
    from sparsecode.checkpoint import latest_checkpoint, load_coder, load_state, save_checkpoint
    from sparsecode.data.source import open_source

    with one_thread():
        cfg = TrainConfig(method="batchtopk", coder={"m": 128, "k": 4, "dead_tokens": 5000}, source=FEATURES,
                          steps=60, batch_size=256, lr=2e-3, log_every=10)
        train(cfg, tmp_path / "run")
    coder = load_coder(tmp_path / "run")
    x = open_source(FEATURES, "eval").next_batch(4096)
    with torch.no_grad():
        pre = coder.pre_acts(x).relu().flatten()
    step, state = load_state(latest_checkpoint(tmp_path / "run"))
    for theta, off in ((pre.topk(4 * 4096).values[-1], False), (pre.topk(4 * 4096).values[-1] / 2, True)):
        coder.threshold.fill_(float(theta))
        save_checkpoint(tmp_path / "run", step, coder, state)
        found = [f for f in diagnose_run(tmp_path / "run") if "inference L0" in f.what]
        assert bool(found) == off, found
    assert "held-out L0" in found[0].figure and "for k = 4" in found[0].figure
