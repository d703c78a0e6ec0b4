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
from sparsecode.diagnose.doctor import DIAGNOSIS, HEALTHY
from sparsecode.evaluate import diagnose_run
from sparsecode.train import TrainConfig, train

FEATURES = SourceConfig(kind="synthetic", options={"d": 32, "n_features": 64, "active": 2})
CLUSTERS = SourceConfig(kind="clusters", options={"d": 16, "n_clusters": 64})
BASE = dict(method="topk", coder={"m": 128, "k": 4, "dead_tokens": 5000}, source=FEATURES, steps=150,
            batch_size=256, lr=2e-3, log_every=10)
FAST = dict(decay="constant", warmup_steps=0)  # the lr as given from the first step to the last


def findings(tmp_path, name: str, **kw) -> list[dict[str, str]]:
    with one_thread():
        train(TrainConfig(**{**BASE, **kw}), tmp_path / name)
        return diagnose_run(tmp_path / name)["findings"]


def causes(tmp_path, name: str, **kw) -> list[str]:
    return [f["cause"] for f in findings(tmp_path, name, **kw)]


def named(found: list[dict[str, str]], what: str, cause: str) -> dict[str, str]:
    """The finding of symptom `what` with cause `cause` (both prefixes); fails naming what was found."""
    hits = [f for f in found if f["what"].startswith(what) and f["cause"].startswith(cause)]
    assert hits, [(f["what"], f["cause"]) for f in found]
    return hits[0]


def npy(tmp_path, name: str, rows: np.ndarray) -> SourceConfig:
    np.save(tmp_path / name, rows.astype(np.float32))
    return SourceConfig(kind="npy", path=str(tmp_path / name))


def test_a_dead_window_longer_than_the_run(tmp_path):
    coder = {"m": 512, "k": 4}
    assert any("dead window is longer than the run" in c
               for c in causes(tmp_path, "long", coder={**coder, "dead_tokens": 1_000_000}, lr=1e-2))
    assert not any("dead window" in c for c in causes(tmp_path, "short", coder={**coder, "dead_tokens": 2000}, lr=1e-2))


def test_a_restart_wait_longer_than_the_run(tmp_path):
    """Codes started at random, restart_after·m past the run's end and a dead window set as long stay unused; with
    the run's own window (a quarter of it) the restarts bring them into use and the cause is not named."""
    vq = dict(method="vq", source=CLUSTERS, steps=60, lr=1e-3)
    slow = {"m": 256, "init": "random", "restart_after": 100}
    hit = named(findings(tmp_path, "long", coder={**slow, "dead_tokens": 10**6}, **vq),
                "unused atoms:", "codes restart only after more unused rows than the run saw")
    assert hit["fix"] == f"--set dead_tokens={60 * 256 // 4} (a quarter of the run), then retrain", hit
    assert "min(restart_after·m, dead_tokens) = 25600 ≥ 15360" in hit["figure"], hit
    assert not any(f["cause"].startswith("codes restart only after")
                   for f in findings(tmp_path, "own", coder=slow, **vq))


def test_restarts_that_never_settle(tmp_path):
    vq = dict(method="vq", source=CLUSTERS, steps=60, lr=1e-3)
    hit = named(findings(tmp_path, "churn", coder={"m": 64, "init": "random", "restart_after": 0.01}, **vq),
                "restarts that never settle", "codes keep being moved after half the run")
    assert hit["fix"].startswith("--set restart_after=0.04 (now 0.01)"), hit
    # the same wait set through the run's dead window instead: the fix names that window
    hit = named(findings(tmp_path, "window", coder={"m": 64, "init": "random", "dead_tokens": 1}, **vq),
                "restarts that never settle", "codes keep being moved after half the run")
    assert hit["fix"].startswith("--set dead_tokens=2 (now 1)"), hit
    # 32 rows per code in a batch of 2,048: a code unused for restart_after·m = 512 rows is the rare exception
    calm = causes(tmp_path, "calm", coder={"m": 64}, batch_size=2048, **vq)
    assert "codes keep being moved after half the run" not in calm


def test_codes_at_another_scale_and_a_dominant_dimension(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(32, 8))
    rows = centres[rng.integers(0, 32, 20000)] + 0.05 * rng.normal(size=(20000, 8))
    wide = rows.copy()
    wide[:, 0] *= 30
    vq = dict(method="vq", steps=40, coder={"m": 64, "init": "random", "restart_after": 0})
    far = findings(tmp_path, "far", source=npy(tmp_path, "far.npy", rows * 100), **vq)
    assert named(far, "unused atoms", "the codes sit at another scale than the data")["fix"] == "--set init=kmeans"
    wide_found = findings(tmp_path, "wide", source=npy(tmp_path, "wide.npy", wide), **vq)
    hit = named(wide_found, "unused atoms", "one dimension holds most of the variance")
    assert hit["fix"].startswith("--set metric=cosine") and "dimension 0 holds" in hit["figure"]
    assert not any("one dimension" in f["cause"] for f in far)


@pytest.mark.parametrize("lr, cause", [(0.5, "the learning rate is too high"),
                                       (1e-8, "the learning rate is too low (or nothing trains)")])
def test_the_learning_rate_judged_from_the_curve(tmp_path, lr, cause):
    assert cause in causes(tmp_path, "lr", lr=lr, **FAST)
    assert not any("learning rate" in c for c in causes(tmp_path, "good", lr=2e-3))


def test_a_loss_that_swings_asks_for_a_lower_learning_rate(tmp_path):
    """kvbottleneck takes plain SGD steps: at lr 45 they overshoot, and the logged FVU goes up and down."""
    found = findings(tmp_path, "kv", method="kvbottleneck", coder={"m": 64, "heads": 4, "head_dim": 4},
                     steps=60, lr=45, log_every=5, **FAST)
    hit = named(found, "a loss that swings up and down", "the learning rate is too high: the steps overshoot")
    assert hit["fix"] == "--lr 15" and "between logs in the second half" in hit["figure"]
    calm = findings(tmp_path, "kv_calm", method="kvbottleneck", coder={"m": 64, "heads": 4, "head_dim": 4},
                    steps=60, lr=10, log_every=5, **FAST)
    assert not any("swings" in f["what"] for f in calm)


def test_a_healthy_run_has_no_finding(tmp_path, capsys):
    found = findings(tmp_path, "ok")
    assert found == []
    assert main(["diagnose", str(tmp_path / "ok")]) == 0
    assert capsys.readouterr().out.strip() == HEALTHY


def test_dense_atoms_from_k_a_large_share_of_m(tmp_path):
    hit = named(findings(tmp_path, "k16", coder={"m": 64, "k": 16, "dead_tokens": 5000}, steps=60),
                "dense atoms:", "k is a large share of m")
    assert hit["figure"] == "k/m = 16/64 = 25%" and hit["fix"] == "-m 320 (or -k 3)"


def test_dense_atoms_from_a_weak_sparsity_penalty(tmp_path):
    hit = named(findings(tmp_path, "relu", method="relu", coder={"m": 128, "l1_coef": 5e-4}, steps=60),
                "dense atoms:", "the sparsity penalty is too weak")
    assert hit["fix"] == "--set l1_coef=0.005" and "l1_coef=0.0005" in hit["figure"]


def test_dense_jumprelu_atoms_want_a_target_l0(tmp_path):
    hit = named(findings(tmp_path, "jumprelu", method="jumprelu", coder={"m": 128, "l0_coef": 1e-5}, steps=60),
                "dense atoms:", "the L0 penalty does not set the L0")
    assert hit["fix"] == "--set k=4 (a target L0)" and "l0_coef=1e-05" in hit["figure"]


def test_dense_atoms_from_dense_frequency_targets(tmp_path):
    gba = dict(method="gba", steps=60)
    hit = named(findings(tmp_path, "gba", coder={"m": 128, "freq_max": 0.5, "freq_min": 0.2}, **gba),
                "dense atoms:", "the target frequencies ask for dense latents")
    assert hit["fix"] == "--set freq_max=0.05 --set freq_min=0.0005" and hit["figure"].startswith("freq_max=0.5")


def test_dense_atoms_from_a_decoder_bias_that_ran_away(tmp_path):
    """gba keeps b_dec at the data mean by default; trained at a high lr it runs off and atoms fire on most rows."""
    hit = named(findings(tmp_path, "gba", method="gba", coder={"m": 128, "train_b_dec": True}, lr=0.02),
                "dense atoms:", "the decoder bias b_dec ran away from the data mean")
    assert hit["fix"] == "--set train_b_dec=false" and "× the rows' rms spread" in hit["figure"]


def test_dense_atoms_from_encoder_biases_that_ran_away(tmp_path):
    """A healthy run whose checkpoint gets 20 encoder biases raised to 3× the spread of their input term."""
    from sparsecode.checkpoint import latest_checkpoint, load_coder, load_state, save_checkpoint
    from sparsecode.data.source import open_source

    assert findings(tmp_path, "run") == []
    coder = load_coder(tmp_path / "run")
    x = open_source(FEATURES, "eval").next_batch(4096)
    with torch.no_grad():
        coder.b_enc[:20] = 3 * (x @ coder.W_enc[:20].t()).std(0)
    step, state = load_state(latest_checkpoint(tmp_path / "run"))
    save_checkpoint(tmp_path / "run", step, coder, state)
    hit = named(diagnose_run(tmp_path / "run")["findings"], "dense atoms:",
                "the encoder biases of the dense atoms ran away")
    assert hit["fix"] == "--lr 0.0002" and "× the spread of W_enc·x" in hit["figure"]


def test_passive_variables_from_a_saturated_encoder(tmp_path):
    found = findings(tmp_path, "fsq", method="fsq", coder={}, steps=40, lr=0.5, **FAST)
    hit = named(found, "passive variables:", "the encoder's offset outweighs its spread")
    assert hit["fix"] == "--lr 0.05" and "× its spread" in hit["figure"]
    assert "the learning rate is too high" in [f["cause"] for f in found if f["what"].startswith("passive")]


def test_passive_variables_from_the_data_scale(tmp_path):
    rows = np.random.default_rng(0).normal(size=(20000, 16))
    fsq = dict(method="fsq", coder={}, steps=40)
    found = findings(tmp_path, "tiny", source=npy(tmp_path, "tiny.npy", rows * 1e-3), **fsq)
    hit = named(found, "passive variables:", "the activations sit at a scale the input projection does not reach")
    assert "rms per dimension is 0.001" in hit["figure"] and hit["fix"].startswith("multiply the activations by 99")
    # the FVU far above 1 comes from the scale too, not from the learning rate
    assert named(found, "a reconstruction worse than the data mean", "the activations sit at a scale")
    assert not any("learning rate" in f["cause"] for f in found)
    assert not any(f["what"].startswith("passive") for f in
                   findings(tmp_path, "unit", source=npy(tmp_path, "unit.npy", rows), **fsq))


def test_codes_collapsed_onto_few_directions(tmp_path):
    """Random codes four times further out than the rows, trained by the codebook loss at a high lr: a few
    take every row, and the used codes span a few of the data's sixteen directions."""
    vq = dict(method="vq", source=CLUSTERS, steps=60, lr=0.5)
    found = findings(tmp_path, "far", coder={"m": 64, "ema": False, "init": "random", "restart_after": 0}, **vq)
    hit = named(found, "codes collapsed onto few directions", "the codes sit at another scale than the data")
    assert hit["fix"] == "--set init=kmeans" and "effective rank" in hit["what"]
    near = findings(tmp_path, "near", coder={"m": 64, "ema": False, "restart_after": 0}, **vq)
    assert not any(f["what"].startswith("codes collapsed") for f in near)


def test_duplicated_atoms_on_data_with_few_distinct_points(tmp_path):
    points = SourceConfig(kind="clusters", options={"d": 16, "n_clusters": 8, "spread": 0.0})
    found = findings(tmp_path, "eight", method="vq", coder={"m": 64}, source=points, steps=40)
    hit = named(found, "duplicated atoms:", "the data has fewer distinct points than the codebook has codes")
    assert hit["fix"] == "-m 8" and "hold 8 distinct points for m = 64" in hit["figure"]
    assert not any("never fell" in f["what"] for f in found)  # it starts at FVU ≈ 0: nothing left to fall
    spread = findings(tmp_path, "spread", method="vq", coder={"m": 64}, source=CLUSTERS, steps=40)
    assert not any(f["what"].startswith("duplicated") for f in spread)


def test_the_command_prints_cause_figure_and_fix(tmp_path, capsys):
    args = ["train", "-m", "512", "-k", "4", "--source-opt", "d=32", "--source-opt", "n_features=64",
            "--set", "dead_tokens=1000000", "--steps", "100", "--batch-size", "256", "--lr", "0.01",
            "--no-progress", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["diagnose", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "unused atoms:" in out and "cause: the dead window is longer than the run" in out
    assert "figure: dead_tokens=1000000 ≥ 25600 tokens trained" in out and "fix: --set dead_tokens=1280" in out
    assert main(["diagnose", str(tmp_path / "r"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "r" / DIAGNOSIS).read_text())  # --json prints what the run keeps
    assert {"what", "cause", "figure", "fix"} <= set(printed["findings"][0]) and printed["text"] == out.strip()
    assert main(["diagnose", str(tmp_path / "nowhere")]) == 2
    assert main(["diagnose", str(tmp_path / "r"), "--rows", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["sparsecode: error: run directory not found: "
                                                            f"{tmp_path / 'nowhere'}",
                                                            "sparsecode: error: rows must be positive, got 0"]


def test_the_diagnosis_is_kept_with_its_checkpoint_and_reused(tmp_path):
    with one_thread():
        train(TrainConfig(**{**BASE, "steps": 30}), tmp_path / "r")
        first = diagnose_run(tmp_path / "r")
        kept = json.loads((tmp_path / "r" / DIAGNOSIS).read_text())
        assert kept == first and kept["checkpoint"] == "step-0000030" and kept["rows"] == 4096
        (tmp_path / "r" / DIAGNOSIS).write_text(json.dumps({**kept, "text": "kept"}))
        assert diagnose_run(tmp_path / "r", reuse=True)["text"] == "kept"  # of the last checkpoint: not recomputed
        assert diagnose_run(tmp_path / "r")["text"] == first["text"]  # without reuse: computed afresh
        (tmp_path / "r" / DIAGNOSIS).write_text(json.dumps({**kept, "checkpoint": "step-0000010", "text": "old"}))
        assert diagnose_run(tmp_path / "r", reuse=True)["text"] == first["text"]  # of another checkpoint: stale


def test_a_diagnosed_run_still_resumes(tmp_path):
    with one_thread():
        train(TrainConfig(**{**BASE, "steps": 20}), tmp_path / "r")
        diagnose_run(tmp_path / "r")
        train(TrainConfig(**{**BASE, "steps": 30}), tmp_path / "r", resume=True)


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
        found = [f for f in diagnose_run(tmp_path / "run")["findings"] if "inference L0" in f["what"]]
        assert bool(found) == off, found
    assert "held-out L0" in found[0]["figure"] and "for k = 4" in found[0]["figure"]


@pytest.mark.parametrize("rate,cause,fix", [
    (0.1, "θ has not risen far enough", "--set theta_lr=0.15 (or train longer)"),  # measured L0 94.4
    (30.0, "θ overshot", "--set theta_lr=20"),  # measured L0 0.4
])
def test_a_jumprelu_l0_off_its_target(tmp_path, rate, cause, fix):
    found = findings(tmp_path, "j", method="jumprelu", coder={"m": 128, "k": 4, "theta_lr": rate}, steps=60)
    hit = named(found, "an L0 off its target", cause)
    assert hit["fix"] == fix and "for the target k = 4" in hit["figure"]
