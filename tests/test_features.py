"""The feature database: its statistics, top contexts, samples, co-firing, neighbours and logit effects equal a
brute-force computation on a small store; a killed build resumes to the same database; user errors are one line."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import gpt2_dir, minilm_store, write_corpus  # noqa: F401

from sparsecode.cli import main
from sparsecode.data.harvest import HarvestConfig, harvest
from sparsecode.data.source import SourceConfig
from sparsecode.data.store import Store
from sparsecode.feature_db import DB, PROGRESS, FeatureDB
from sparsecode.features import FeatureConfig, build_features
from sparsecode.interop import load_coder
from sparsecode.train import TrainConfig, train

TOP = 16


def small_store(model: Path, corpus: Path, out: Path, hook: str = "transformer.h.1", tokens: int = 10**6) -> Path:
    harvest(HarvestConfig(out=str(out), model=str(model), hook=hook, corpus=str(corpus), tokens=tokens, context=32,
                          dtype="fp32", shard_tokens=1000, batch_contexts=8))
    return out


def small_run(store: Path, out: Path, method: str = "topk", coder: dict | None = None) -> Path:
    train(TrainConfig(method=method, coder=coder or {"m": 64, "k": 4}, init_rows=1024,
                      source=SourceConfig(kind="store", path=str(store), heldout=0.1), steps=30, batch_size=256), out)
    return out


def copy_run(run: Path, out: Path) -> Path:
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(DB, "*.tmp"))
    return out


@pytest.fixture(scope="session")
def gpt2_store(gpt2_dir, tmp_path_factory) -> Path:  # noqa: F811
    """About 3,300 tokens of the tiny GPT-2 (a causal LM) at transformer.h.1, fp32, in 4 shards."""
    root = tmp_path_factory.mktemp("features")
    return small_store(gpt2_dir, write_corpus(root / "corpus", docs=40, words=80), root / "store")


@pytest.fixture(scope="session")
def topk_run(gpt2_store, tmp_path_factory) -> Path:
    """A TopK run (m=64, k=4) on gpt2_store with its feature database, built in chunks of 256 rows."""
    run = small_run(gpt2_store, tmp_path_factory.mktemp("topk") / "run")
    build_features(run, cfg=FeatureConfig(chunk_rows=256, top=TOP))
    return run


def brute(store: Path, run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(every row of the store, the dense [rows, m] code of all of them encoded at once)."""
    s = Store(store)
    x = s.gather(torch.arange(s.n))
    with torch.no_grad():
        return x, load_coder(run).encode(x).to_dense()


def rows_of(db: sqlite3.Connection, f: int, kind: str) -> list[tuple]:
    return db.execute("SELECT row, value, center, tokens, acts FROM contexts WHERE feature = ? AND kind = ? "
                      "ORDER BY rank", (f, kind)).fetchall()


def test_top_contexts_equal_brute_force(gpt2_store, topk_run):
    x, dense = brute(gpt2_store, topk_run)
    store = Store(gpt2_store)
    tokens = store.gather(torch.arange(store.n), "tokens")
    db = sqlite3.connect(topk_run / DB)
    stats = {f: (c, d, mx) for f, c, d, mx in db.execute("SELECT id, count, density, max FROM features")}
    assert len(stats) == 64
    for f in range(64):
        col = dense[:, f]
        fired = (col != 0).nonzero()[:, 0]
        order = sorted(fired.tolist(), key=lambda r: (-float(col[r]), r))[:TOP]
        got = rows_of(db, f, "top")
        assert [g[0] for g in got] == order, f"feature {f}: top rows differ"
        np.testing.assert_allclose([g[1] for g in got], col[order].numpy(), rtol=1e-5, atol=1e-6)
        count, density, mx = stats[f]
        assert count == len(fired) and density == pytest.approx(len(fired) / store.n)
        if len(fired):
            assert mx == pytest.approx(float(col.max()), rel=1e-5)
        for row, value, center, toks, acts in got:  # the window: the store's tokens, the atom's activation on each
            toks, acts = np.frombuffer(toks, np.int32), np.frombuffer(acts, np.float32)
            assert toks[center] == tokens[row] and acts[center] == pytest.approx(value, rel=1e-5)
            shown = np.nonzero(toks >= 0)[0]
            rows = row - center + shown
            assert (toks[shown] == tokens[rows].numpy()).all()
            np.testing.assert_allclose(acts[shown], dense[rows, f].numpy(), rtol=1e-5, atol=1e-6)


def test_samples_and_cofiring_equal_brute_force(gpt2_store, topk_run, tmp_path):
    """With a reservoir larger than any atom's firings the samples span all of them and co-firing is exact."""
    run = copy_run(topk_run, tmp_path / "run")
    build_features(run, cfg=FeatureConfig(chunk_rows=512, reservoir=4096, samples=5))
    _, dense = brute(gpt2_store, run)
    fired = dense != 0
    db = sqlite3.connect(run / DB)
    checked = 0
    for f in range(64):
        n_f = int(fired[:, f].sum())
        samples = rows_of(db, f, "sample")
        assert len(samples) == min(5, n_f)
        values = sorted(dense[fired[:, f], f].tolist(), reverse=True)
        if n_f >= 5:  # evenly spaced order statistics: the max, the quartiles, the min
            want = [values[round(j * (n_f - 1) / 4)] for j in range(5)]
            np.testing.assert_allclose([s[1] for s in samples], want, rtol=1e-5)
        assert all(dense[s[0], f] == pytest.approx(s[1], rel=1e-5) for s in samples)
        co = db.execute("SELECT other, share FROM cofiring WHERE feature = ? ORDER BY rank", (f,)).fetchall()
        if n_f:
            share = (fired[fired[:, f]].double().mean(0))
            share[f] = 0
            want = sorted(share[share > 0].tolist(), reverse=True)[:8]
            np.testing.assert_allclose([s for _, s in co], want, rtol=1e-9)
            assert all(share[g] == pytest.approx(s) for g, s in co)
            checked += 1
    assert checked > 50


def test_neighbours_and_logit_effects_equal_brute_force(gpt2_dir, topk_run):  # noqa: F811
    from transformers import AutoModelForCausalLM

    atoms = load_coder(topk_run).atoms().detach().float()
    unit = torch.nn.functional.normalize(atoms, dim=1)
    cos = (unit @ unit.T).fill_diagonal_(-2)
    w_u = AutoModelForCausalLM.from_pretrained(gpt2_dir).get_output_embeddings().weight.detach()
    logits = atoms @ w_u.T
    db = sqlite3.connect(topk_run / DB)
    for f in (0, 17, 63):
        nb = db.execute("SELECT other, cos FROM neighbours WHERE feature = ? ORDER BY rank", (f,)).fetchall()
        want = cos[f].topk(8)
        assert [o for o, _ in nb] == want.indices.tolist()
        np.testing.assert_allclose([c for _, c in nb], want.values.numpy(), rtol=1e-5)
        for sign in (1, -1):
            got = db.execute("SELECT token, value FROM logits WHERE feature = ? AND sign = ? ORDER BY rank",
                             (f, sign)).fetchall()
            want = (sign * logits[f]).topk(10)
            assert [t for t, _ in got] == want.indices.tolist()
            np.testing.assert_allclose([v for _, v in got], sign * want.values.numpy(), rtol=1e-4)


def test_codebook_database(gpt2_store, tmp_path):
    """A VQ codebook: usage counts, unused codes, and contexts ranked by the cosine to the picked code."""
    run = small_run(gpt2_store, tmp_path / "vq", "vq", {"m": 96})
    build_features(run, cfg=FeatureConfig(chunk_rows=300, top=4))
    x, dense = brute(gpt2_store, run)
    codes = dense.argmax(1)
    counts = torch.bincount(codes, minlength=96)
    fdb = FeatureDB(run)
    assert fdb.meta["codebook"] and fdb.meta["score"] == "cosine" and fdb.meta["dead"] == int((counts == 0).sum())
    assert fdb.overview()["dead"] == (counts == 0).nonzero()[:, 0].tolist()
    unit = torch.nn.functional.normalize(load_coder(run).atoms().detach(), dim=1)
    cos = (torch.nn.functional.normalize(x, dim=1) * unit[codes]).sum(1)
    for c in counts.nonzero()[:, 0].tolist()[:20]:
        info = fdb.feature(c)
        assert info["count"] == counts[c]
        picked = (codes == c).nonzero()[:, 0]
        want = picked[cos[picked].argsort(descending=True, stable=True)][:4]
        assert [t["row"] for t in info["contexts"]["top"]] == want.tolist()
        assert info["max"] == pytest.approx(float(cos[picked].max()), abs=1e-5)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsecode", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_killed_build_resumes_to_the_same_database(topk_run, tmp_path):
    run = copy_run(topk_run, tmp_path / "run")
    args = ("features", str(run), "--chunk-rows", "256", "--top", str(TOP), "--save-every", "0", "--no-progress")
    killed = run_cli(*args, env={"SPARSECODE_FAILPOINT": "features-saved"})
    assert killed.returncode == -9 and (run / PROGRESS).is_file() and not (run / DB).exists()
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "resuming the feature pass at row 256" in done.stdout
    assert not list(run.glob("*.tmp"))
    a, b = sqlite3.connect(topk_run / DB), sqlite3.connect(run / DB)
    for table in ("features", "contexts", "vocab", "feature_tokens", "neighbours", "cofiring", "logits"):
        want = a.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
        assert b.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall() == want, table


def test_user_errors_are_one_line(gpt2_dir, gpt2_store, topk_run, tmp_path, capsys):  # noqa: F811
    wide = small_store(gpt2_dir, write_corpus(tmp_path / "c", docs=4), tmp_path / "wide", "transformer.h.0.mlp.c_fc",
                       tokens=300)
    (tmp_path / "junk").mkdir()
    cases = [(["features", str(tmp_path / "nope")], "run directory not found"),
             (["features", str(topk_run), "--data", str(tmp_path / "junk")], "is not an activation store"),
             (["features", str(topk_run), "--data", str(wide)], "d=128 activations but the run reads d_in=32"),
             (["browse", str(tmp_path / "junk")], "not found")]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_minilm_token_search(minilm_store, tmp_path):  # noqa: F811
    """Real activations of an encoder: no logit effects; the features that fire on `def` are found by text."""
    run = small_run(minilm_store, tmp_path / "run", coder={"m": 128, "k": 8})
    build_features(run, cfg=FeatureConfig(tokens=16384, chunk_rows=4096))
    fdb = FeatureDB(run)
    assert not fdb.meta["logits"] and fdb.meta["rows"] == 16384
    rows, total = fdb.features(q="def", sort="hits")
    assert total > 0 and rows[0]["hits"] > 0
    info = fdb.feature(rows[0]["id"])
    centers = [t["text"] for c in info["contexts"]["top"] + info["contexts"]["sample"] for t in c["tokens"]
               if t["center"]]
    assert any(t.strip().lower() == "def" for t in centers)
    assert not info["boosted"] and not info["suppressed"]
