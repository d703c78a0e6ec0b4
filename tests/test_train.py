import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import topk_config, vq_config
from safetensors.torch import load_file

from sparsecode.checkpoint import latest_checkpoint
from sparsecode.data.source import SourceConfig, TensorSource, open_source
from sparsecode.errors import SparsecodeError
from sparsecode.metrics import fvu
from sparsecode.train import TrainConfig, train


class Killed(Exception):
    pass


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


def kill_at(step: int):
    def hook(s: int) -> None:
        if s == step:
            raise Killed

    return hook


@pytest.mark.parametrize("make", [
    lambda: topk_config(steps=200, ckpt_every=25, coder={"m": 128, "k": 6, "dead_tokens": 2048}, batch_size=256),
    lambda: vq_config(steps=200, ckpt_every=25, batch_size=256, coder={"restart_after": 5}),
])
def test_kill_and_resume_gives_identical_parameters(tmp_path, make):
    every = make().log_every
    torch.use_deterministic_algorithms(True)
    try:
        train(make(), tmp_path / "straight")
        with pytest.raises(Killed):
            train(make(), tmp_path / "resumed", on_step=kill_at(137))  # last checkpoint at 125
        assert latest_checkpoint(tmp_path / "resumed").name == "step-0000125"
        train(make(), tmp_path / "resumed", resume=True)
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(every, 201, every))  # no duplicates after the resume


def test_cli_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    args = [sys.executable, "-m", "sparsecode", "train", "--method", "topk", "-m", "128", "-k", "6",
            "--source-opt", "d=64", "--steps", "300", "--batch-size", "256", "--ckpt-every", "20",
            "--no-progress"]
    subprocess.run(args + ["--out", str(tmp_path / "a")], check=True, capture_output=True)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "b")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = tmp_path / "b" / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step-0000060"):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "checkpoints" / "step-0000300").exists(), "killed too late to test anything"
    subprocess.run(args + ["--out", str(tmp_path / "b"), "--resume"], check=True, capture_output=True)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "b" / "checkpoints").glob(".*tmp"))  # no half-written checkpoint left


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert cfg.lr_factor(0) == pytest.approx(0.1)
    assert cfg.lr_factor(9) == pytest.approx(1.0)
    assert cfg.lr_factor(10) == pytest.approx(1.0)
    assert cfg.lr_factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cfg.lr_factor(110) == pytest.approx(0.1)
    assert TrainConfig(steps=110, warmup_steps=10, decay="linear").lr_factor(60) == pytest.approx(0.55)


def test_nan_batch_is_one_clear_error_and_keeps_last_checkpoint(tmp_path):
    data = torch.randn(4096, 16)
    data[3000, 5] = float("nan")
    src = TensorSource(data, seed=0)
    cfg = TrainConfig(method="topk", coder={"m": 32, "k": 4}, steps=50, batch_size=128, ckpt_every=5,
                      init_rows=0)
    with pytest.raises(SparsecodeError, match=r"batch at step [1-9]\d* contains NaN or inf values"):
        train(cfg, tmp_path / "run", source=src)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and (ckpt / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["source"]["kind"] == "memory"


def test_data_width_must_match_the_run(tmp_path):
    cfg = TrainConfig(method="topk", coder={"d_in": 32, "m": 64, "k": 4}, steps=5, source=SourceConfig())
    with pytest.raises(SparsecodeError, match="the data has d=64 but the run expects d_in=32"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_existing_run_needs_resume_and_same_config(tmp_path):
    cfg = topk_config(steps=10, coder={"m": 64, "k": 4})
    train(cfg, tmp_path / "run")
    with pytest.raises(SparsecodeError, match="already exists"):
        train(topk_config(steps=10, coder={"m": 64, "k": 4}), tmp_path / "run")
    with pytest.raises(SparsecodeError, match="another config"):
        train(topk_config(steps=10, coder={"m": 64, "k": 5}), tmp_path / "run", resume=True)


def test_metrics_log_has_the_promised_fields(tmp_path):
    train(topk_config(steps=20, log_every=10, coder={"m": 64, "k": 4}), tmp_path / "run")
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [10, 20]
    for key in ("tokens_per_s", "fvu", "l0", "dead", "utilisation", "perplexity", "loss", "lr"):
        assert key in rec[-1] and np.isfinite(rec[-1][key]), key
    assert rec[-1]["tokens"] == 20 * 1024
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["method"] == "topk" and cfg["coder"]["d_in"] == 64
    assert TrainConfig.from_dict(cfg).coder == cfg["coder"]


def test_diverged_loss_is_one_clear_error_before_anything_is_saved(tmp_path):
    """Finite rows whose squares overflow fp32 give an infinite loss: the run stops before it checkpoints."""
    src = TensorSource(torch.randn(4096, 16) * 1e20, seed=0)
    cfg = TrainConfig(method="topk", coder={"m": 32, "k": 4}, steps=50, batch_size=128, ckpt_every=3,
                      log_every=10, init_rows=0)
    with pytest.raises(SparsecodeError, match=r"the loss became (nan|inf) between steps 1 and 3; lower the lr"):
        train(cfg, tmp_path / "run", source=src)
    assert not (tmp_path / "run").exists()  # nothing to resume from: the folder this call made is gone


def test_bf16_autocast_trains_as_well_as_fp32(tmp_path):
    """precision=bf16 (autocast of the forward; the default on CUDA) reaches the fp32 run's FVU within 5%."""
    batch = open_source(topk_config().source, "eval").next_batch(4096)
    fvus = {}
    for precision in ("fp32", "bf16"):
        coder = train(topk_config(steps=300, precision=precision), tmp_path / precision)
        with torch.no_grad():
            fvus[precision] = float(fvu(batch, coder(batch).x_hat))
    assert fvus["bf16"] < 1.05 * fvus["fp32"] and fvus["bf16"] != fvus["fp32"], fvus
    assert fvus["fp32"] < 0.5, fvus


def test_deterministic_kernels_are_on_while_training_and_restored_after(tmp_path):
    """--deterministic (bit-exact resume on CUDA) switches deterministic algorithms on for the run only."""
    seen = []
    cfg = topk_config(steps=3, coder={"m": 64, "k": 4}, deterministic=True)
    train(cfg, tmp_path / "run", on_step=lambda s: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen == [True] * 3 and not torch.are_deterministic_algorithms_enabled()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["deterministic"] is True
    train(topk_config(steps=2, coder={"m": 64, "k": 4}), tmp_path / "plain",
          on_step=lambda s: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen[3:] == [False, False]


def test_the_callers_config_is_left_as_it_was(tmp_path):
    """The trainer fills in d_in and the in-memory source on its own copy, never on the caller's config."""
    import copy

    cfg = TrainConfig(method="topk", coder={"m": 32, "k": 4}, steps=2, batch_size=64, init_rows=64)
    before = copy.deepcopy(cfg)
    train(cfg, tmp_path / "run", source=TensorSource(torch.randn(512, 8)))
    assert cfg == before and cfg.source is None and "d_in" not in cfg.coder
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["coder"]["d_in"] == 8 and saved["source"]["kind"] == "memory"


def test_an_auto_dead_window_is_resolved_once_and_kept_when_a_resume_changes_steps(tmp_path):
    """dead_tokens=None becomes a twentieth of the run's tokens in config.json; resuming with more steps (the same
    config object, dead_tokens still None) keeps that window instead of resolving it again."""
    import dataclasses

    from sparsecode.checkpoint import load_coder

    data = torch.randn(1024, 8)
    cfg = TrainConfig(method="topk", coder={"m": 32, "k": 4}, steps=20, batch_size=64, init_rows=64, log_every=10)
    train(cfg, tmp_path / "run", source=TensorSource(data))
    saved = lambda: json.loads((tmp_path / "run" / "config.json").read_text())  # noqa: E731
    assert saved()["coder"]["dead_tokens"] == 64 and load_coder(tmp_path / "run").cfg.dead_tokens == 64
    coder = train(dataclasses.replace(cfg, steps=40), tmp_path / "run", source=TensorSource(data), resume=True)
    assert saved()["steps"] == 40 and saved()["coder"]["dead_tokens"] == coder.cfg.dead_tokens == 64
    assert latest_checkpoint(tmp_path / "run").name == "step-0000040"
    explicit = dataclasses.replace(cfg, coder={"m": 32, "k": 4, "dead_tokens": 1000})
    assert train(explicit, tmp_path / "explicit", source=TensorSource(data)).cfg.dead_tokens == 1000


def test_a_calibrated_run_resumed_with_more_steps_ends_as_a_straight_run(tmp_path):
    """batchtopk calibrates its threshold after the last step, on rows read past the run's end: a finished run
    resumed with more steps ends with the straight run's exact weights, EMA and threshold."""
    def cfg(steps: int) -> TrainConfig:
        return TrainConfig(method="batchtopk", coder={"m": 64, "k": 4, "dead_tokens": 2048}, steps=steps,
                           source=SourceConfig(options={"d": 16, "n_features": 32, "active": 2}), batch_size=128,
                           ckpt_every=10, log_every=10, init_rows=256, decay="constant")  # lr not tied to the length

    train(cfg(40), tmp_path / "straight")
    train(cfg(20), tmp_path / "resumed")
    first = weights(tmp_path / "resumed")
    assert first["threshold"] != first["threshold_ema"]  # calibrated at step 20
    train(cfg(40), tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["threshold"] != a["threshold_ema"]


def test_a_checkpoint_of_another_optimizer_layout_is_refused_before_anything_is_written(tmp_path):
    """A jumprelu checkpoint whose optimizer holds one parameter group (saved before θ had its own) is refused in
    one line, and the run's config and log stay as they were."""
    from sparsecode.checkpoint import load_coder, load_state, save_checkpoint

    cfg = TrainConfig(method="jumprelu", coder={"m": 32}, source=SourceConfig(kind="synthetic"), steps=4,
                      batch_size=64, log_every=2, ckpt_every=2)
    train(cfg, tmp_path / "run")
    step, state = load_state(latest_checkpoint(tmp_path / "run"))
    coder = load_coder(tmp_path / "run")
    state["optimizer"] = torch.optim.Adam(coder.parameters()).state_dict()  # one group, as older runs saved
    save_checkpoint(tmp_path / "run", step, coder, state)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(SparsecodeError, match="optimizer has 1 parameter group"):
        train(TrainConfig(**{**cfg.__dict__, "steps": 8}), tmp_path / "run", resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_methods_schedule_is_resolved_into_the_config_and_an_older_config_clipped(tmp_path):
    """warmup_steps, decay and grad_norm left at None take the method's own (relu: SAELens's constant lr, no warm-up,
    unit gradient) or the trainer's defaults, and config.json names them; a value given wins; a config saved before
    grad_norm existed reads as clip, the way that run trained."""
    from sparsecode.train import load_config

    data = TensorSource(torch.randn(1024, 8))
    for method, coder, want in (("relu", {"m": 32}, ("constant", 0, "unit")),
                                ("topk", {"m": 32, "k": 4}, ("cosine", 10, "clip"))):
        cfg = TrainConfig(method=method, coder=coder, steps=2, batch_size=64, init_rows=64)
        train(cfg, tmp_path / method, source=data)
        saved = json.loads((tmp_path / method / "config.json").read_text())
        assert (saved["decay"], saved["warmup_steps"], saved["grad_norm"]) == want, method
    cfg = TrainConfig(method="relu", coder={"m": 32}, steps=2, batch_size=64, init_rows=64, decay="linear")
    train(cfg, tmp_path / "given", source=data)
    assert load_config(tmp_path / "given").decay == "linear"
    old = json.loads((tmp_path / "relu" / "config.json").read_text())
    del old["grad_norm"]
    (tmp_path / "relu" / "config.json").write_text(json.dumps(old))
    assert load_config(tmp_path / "relu").grad_norm == "clip"


@pytest.mark.parametrize("grad_norm", ["unit", "clip"])
def test_grad_norm_unit_hands_adam_a_gradient_of_norm_one(tmp_path, grad_norm):
    """grad_norm=unit scales every step's global gradient to norm 1; clip (at 1.0) leaves relu's small one alone."""
    from sparsecode.train import Trainer

    cfg = TrainConfig(method="relu", coder={"m": 64}, steps=3, batch_size=128, init_rows=128, grad_norm=grad_norm)
    trainer = Trainer(cfg, tmp_path / "run", source=TensorSource(torch.randn(2048, 16)), progress=False)
    trainer.train_step(torch.randn(128, 16))
    grads = [p.grad for group in trainer.opt.param_groups for p in group["params"] if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads))
    if grad_norm == "unit":
        assert norm == pytest.approx(1.0, rel=1e-4)
    else:
        assert norm < 0.5


def test_an_unset_init_sample_is_sized_by_the_method_and_saved(tmp_path):
    """init_rows=None: 16,384 rows, or 8 per code for a k-means codebook where that is more, capped by memory; the
    resolved number is what config.json records. A number given wins."""
    from sparsecode.coder import auto_init_rows

    data = TensorSource(torch.randn(4096, 8))
    for method, coder, want in (("vq", {"m": 4096}, 32768), ("topk", {"m": 4096, "k": 4}, 16384),
                                ("vq", {"m": 4096, "init": "random"}, 32768)):
        cfg = TrainConfig(method=method, coder=coder, steps=1, batch_size=64)
        train(cfg, tmp_path / f"{method}{len(coder)}", source=data)
        assert json.loads((tmp_path / f"{method}{len(coder)}" / "config.json").read_text())["init_rows"] == want
    train(TrainConfig(method="vq", coder={"m": 4096}, steps=1, batch_size=64, init_rows=64), tmp_path / "given",
          source=data)
    assert json.loads((tmp_path / "given" / "config.json").read_text())["init_rows"] == 64
    assert auto_init_rows(8, 10**6, 4096) == 2**30 // (4 * 4096)  # a wide model: 1 GiB of rows at most
