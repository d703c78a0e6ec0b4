"""Several hooks under torchrun (gloo, 2 CPU ranks): every rank training every hook on its share of each batch, or
each rank owning hooks (the ranks sharing the forward passes), trains the coders one process trains; a killed
rank stops the other in one line, and the runs resume to the straight ones."""

from __future__ import annotations

import time

import pytest
import torch
from data_helpers import gpt2_dir, write_corpus  # noqa: F401
from test_distributed import assert_close, torchrun, weights
from test_multihook import train_args

from sparsecode.cli import main

HOOKS = ("transformer.h.0", "transformer.h.1")


@pytest.fixture(scope="module")
def setup(gpt2_dir, tmp_path_factory):  # noqa: F811
    """The corpus and the one-process run of both hooks."""
    tmp = tmp_path_factory.mktemp("hooks")
    corpus = write_corpus(tmp / "c", docs=12)
    assert main(train_args(gpt2_dir, corpus, tmp / "one", "--hook", "transformer.h.*")) == 0
    return gpt2_dir, corpus, tmp / "one"


@pytest.mark.slow  # ~25 s each; the killed run's resume below checks owned hooks exactly
@pytest.mark.parametrize("mode", ["shares", "by-rank"])
def test_two_ranks_train_the_coders_of_one_process(mode, setup, tmp_path):
    model, corpus, one = setup
    extra = ["--hooks-by-rank"] if mode == "by-rank" else []
    done = torchrun(train_args(model, corpus, tmp_path / "two", "--hook", "transformer.h.*", *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run written to") == 2  # rank 0 reports both runs, once
    for hook in HOOKS:  # owned hooks: each run is one process's, exactly; shares: the batch split, up to rounding
        assert_close(weights(tmp_path / "two" / hook), weights(one / hook), 0.0 if mode == "by-rank" else 1e-5)


def test_a_killed_owner_stops_the_other_and_the_runs_resume(setup, tmp_path):
    model, corpus, one = setup
    args, logs = train_args(model, corpus, tmp_path / "two", "--hook", "transformer.h.*", "--hooks-by-rank"), \
        tmp_path / "logs"
    t0 = time.monotonic()
    died = torchrun(args, logs, SPARSECODE_FAILPOINT="step:13", SPARSECODE_FAILPOINT_RANK="1")
    assert died.returncode != 0 and time.monotonic() - t0 < 60
    survivor = [p for p in logs.rglob("stderr.log") if p.parent.name == "0"]
    lines = [ln for ln in survivor[0].read_text().splitlines() if ln.strip()]
    assert len(lines) == 1 and "sparsecode: error: rank 0: " in lines[0], lines  # one line, no traceback
    for hook in HOOKS:
        assert (tmp_path / "two" / hook / "checkpoints" / "LATEST").read_text() == "step-0000010"
    resumed = torchrun(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for hook in HOOKS:
        for key, value in weights(tmp_path / "two" / hook).items():
            assert torch.equal(value, weights(one / hook)[key]), (hook, key)
