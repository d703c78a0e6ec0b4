"""A harvest split over 2 torchrun ranks (gloo) stores the rows one process stores, reads like any store, resumes
after a rank is killed, and is refused in one line by another number of ranks."""

from __future__ import annotations

import json

import torch
from data_helpers import gpt2_dir, write_corpus  # noqa: F401
from test_distributed import torchrun

from sparsecode.cli import main
from sparsecode.data.store import Store


def harvest_args(gpt2_dir, corpus, out, tokens="700"):  # noqa: F811
    return ["harvest", "--model", str(gpt2_dir), "--hook", "transformer.h.0", "--corpus", str(corpus), "--tokens",
            tokens, "--context", "16", "--dtype", "fp32", "--shard-tokens", "90", "--batch-contexts", "3",
            "--device", "cpu", "--no-progress", "--out", str(out)]


def row_set(path) -> torch.Tensor:
    """Every row as (token, doc, pos, acts...), sorted: the store as a set of rows."""
    store = Store(path)
    idx = torch.arange(store.n)
    rows = torch.cat([torch.stack([store.gather(idx, k).double() for k in ("tokens", "doc", "pos")], 1),
                      store.gather(idx).double()], 1)
    order = (rows[:, 1] * 10**6 + rows[:, 2]).argsort()  # (doc, pos) names a row
    return rows[order]


def test_two_ranks_store_the_rows_of_one_process_and_resume(gpt2_dir, tmp_path, capsys):  # noqa: F811
    corpus = write_corpus(tmp_path / "c", docs=20)
    assert main(harvest_args(gpt2_dir, corpus, tmp_path / "one")) == 0
    done = torchrun(harvest_args(gpt2_dir, corpus, tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stored 700 tokens") == 1  # rank 0 alone prints
    one, two = row_set(tmp_path / "one"), row_set(tmp_path / "two")
    assert torch.equal(one, two)  # the same rows, exactly (fp32 store)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert manifest["ranks"] == 2 and {n.split("/")[0] for n in names} == {"rank-0-of-2", "rank-1-of-2"}

    # rank 1 killed after its first shard: rank 0 stops too, and the same command finishes the same store
    died = torchrun(harvest_args(gpt2_dir, corpus, tmp_path / "killed"), SPARSECODE_FAILPOINT="shard-written",
                    SPARSECODE_FAILPOINT_RANK="1")
    assert died.returncode != 0 and not (tmp_path / "killed" / "manifest.json").exists()
    capsys.readouterr()
    assert main(harvest_args(gpt2_dir, corpus, tmp_path / "killed")) == 2  # one process: refused, nothing written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "split over 2 ranks" in err and "--nproc-per-node 2" in err
    resumed = torchrun(harvest_args(gpt2_dir, corpus, tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.equal(row_set(tmp_path / "killed"), two)
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert main(["train", "--source", str(tmp_path / "two"), "-m", "16", "-k", "2", "--steps", "3", "--batch-size",
                 "32", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]) == 0  # a store like any
    capsys.readouterr()
    assert main(harvest_args(gpt2_dir, corpus, tmp_path / "two")) == 0  # complete: one process reads it, no change
    assert "stored 700 tokens" in capsys.readouterr().out and torch.equal(row_set(tmp_path / "two"), two)
