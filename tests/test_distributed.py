"""Data-parallel training under real torchrun (gloo, 2 CPU ranks): 2 ranks × B/2 rows train the model one process
trains with B rows, rank 0 logs once, a killed rank stops the other within 60 s, and resume is exact."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparsecode import distributed
from sparsecode.checkpoint import latest_checkpoint
from sparsecode.cli import main
from sparsecode.data.source import TensorSource
from sparsecode.errors import SparsecodeError
from sparsecode.files import read_jsonl
from sparsecode.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
# small runs with every reduced statistic in play: AuxK (dead_tokens of 2 batches), BatchTopK's threshold,
# JumpReLU's L0, VQ's k-means start, EMA and restarts (restart_after 0.5·m rows)
METHODS = {
    "topk": ["-k", "4", "--set", "dead_tokens=128"],
    "batchtopk": ["-k", "4", "--set", "dead_tokens=128", "--set", "calibration_rows=512"],
    "jumprelu": ["--set", "l0_coef=0.05"],
    "relu": ["--set", "l1_coef=0.1"],
    "vq": ["--set", "restart_after=0.5", "--set", "kmeans_iters=3"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "acts.npy"
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((24, 16)) * 2
    rows = centres[rng.integers(0, 24, 3000)] + rng.standard_normal((3000, 16)) * 0.5
    np.save(path, (rows * rng.exponential(1.0, (3000, 1))).astype(np.float32))
    return path


def args(data: Path, method: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--method", method, "--source", str(data), "-m", "32", *METHODS[method], "--steps", "20",
            "--batch-size", "64", "--log-every", "5", "--ckpt-every", "10", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def torchrun(argv: list[str], logs: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m sparsecode ...` on gloo; `logs`: each rank's output in its own files."""
    redirect = ["--log-dir", str(logs), "--redirects", "3"] if logs else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *redirect,
           "-m", "sparsecode", *argv]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SPARSECODE_DIST_TIMEOUT": "30", **env}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        scale = b[key].double().abs().max().clamp_min(1e-12)
        err = (a[key].double() - b[key].double()).abs().max() / scale
        assert err <= rel, f"{key}: relative difference {err:.2e} > {rel:g}"


_RUNS: dict[str, Path] = {}


def two_ranks(data: Path, method: str, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run of `method`, trained once per module."""
    if method not in _RUNS:
        out = tmp_path_factory.mktemp("ddp") / method
        done = torchrun(args(data, method, out))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("run written to") == 1  # rank 0 alone prints
        _RUNS[method] = out
    return _RUNS[method]


@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_train_the_one_process_model(method, data, tmp_path, tmp_path_factory):
    two = two_ranks(data, method, tmp_path_factory)
    assert main(args(data, method, tmp_path / "one")) == 0
    assert_close(weights(two), weights(tmp_path / "one"), 1e-5)  # buffers too: since_fired, thresholds, EMA
    log, ref = read_jsonl(two / "metrics.jsonl"), read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in log] == [5, 10, 15, 20]  # written once, by rank 0
    for rec, want in zip(log, ref, strict=True):  # the logged figures are the whole batch's
        for key in ("fvu", "l0", "dead", "utilisation", "loss", "tokens"):
            assert rec[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    if method == "vq":
        assert sum(r["restarts"] for r in ref) > 0  # restarts took place (and matched)
    if method == "topk":
        assert any("loss/auxk" in r for r in ref)  # AuxK took part


def test_a_killed_rank_stops_the_other_and_the_run_resumes_exactly(data, tmp_path, tmp_path_factory):
    out, logs = tmp_path / "run", tmp_path / "logs"
    t0 = time.monotonic()
    died = torchrun(args(data, "topk", out), logs, SPARSECODE_FAILPOINT="step:13", SPARSECODE_FAILPOINT_RANK="1")
    assert died.returncode != 0
    assert time.monotonic() - t0 < 60
    survivor = [p for p in logs.rglob("stderr.log") if p.parent.name == "0"]
    lines = [ln for ln in survivor[0].read_text().splitlines() if ln.strip()]
    assert len(lines) == 1, lines  # one line, no traceback
    # rank 0 sees rank 1 gone at its next collective, or (when torchrun is first) is stopped by its SIGTERM
    assert lines[0].startswith("sparsecode: error: rank 0: ") and ("rank 1" in lines[0] or "SIGTERM" in lines[0]), \
        lines[0]
    assert (out / "checkpoints" / "LATEST").read_text() == "step-0000010"

    resumed = torchrun(args(data, "topk", out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = two_ranks(data, "topk", tmp_path_factory)
    assert_close(weights(out), weights(straight), 0.0)  # exact
    drop = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(out / "metrics.jsonl")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(straight / "metrics.jsonl")]


def test_resume_with_another_number_of_ranks_needs_reshard(data, tmp_path, tmp_path_factory, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_ranks(data, "topk", tmp_path_factory), run)
    assert main(args(data, "topk", run, "--resume", "--steps", "25")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained on 2 rank(s), not 1" in err and "--reshard" in err
    assert '"steps": 20' in (run / "config.json").read_text()  # refused before anything was written
    assert main(args(data, "topk", run, "--resume", "--steps", "25", "--reshard")) == 0
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 25


@pytest.mark.parametrize("kind", ["npy", "store"])
def test_a_rank_reads_only_its_share_of_each_batch(kind, tmp_path):
    if kind == "npy":
        data = torch.arange(40.0).reshape(20, 2)
        whole, parts = TensorSource(data, seed=3), [TensorSource(data, seed=3) for _ in range(2)]
    else:
        from test_store import make_store, source

        store = make_store(tmp_path / "s", n=20, shard=7)
        whole = source(store, seed=3, chunk_rows=4, buffer_rows=8)
        parts = [source(store, seed=3, chunk_rows=4, buffer_rows=8) for _ in range(2)]
    for _ in range(3):  # across an epoch's end
        batch = whole.next_batch(8)
        assert torch.equal(torch.cat([s.next_shard(8, r, 2) for r, s in enumerate(parts)]), batch)
    assert all(s.state_dict() == whole.state_dict() for s in parts)


def test_several_ranks_refuse_what_they_cannot_split(monkeypatch, tmp_path):
    monkeypatch.setattr(distributed, "world", lambda: 2)
    cfg = TrainConfig(method="gba", coder={"d_in": 8, "m": 16}, steps=2, batch_size=8)
    with pytest.raises(SparsecodeError, match="cannot train on several ranks yet"):
        Trainer(cfg, tmp_path / "a")
    cfg = TrainConfig(method="topk", coder={"d_in": 8, "m": 16, "k": 2}, steps=2, batch_size=9)
    with pytest.raises(SparsecodeError, match="multiple of the number of ranks"):
        Trainer(cfg, tmp_path / "b")
