"""Codebooks on real activations (MiniLM-L6 layer 3): every code in use on held-out rows with restarts settled,
where the papers' starts collapse (simvq's random basis, vqbridge's codes at one point)."""

from __future__ import annotations

import json

import pytest
from data_helpers import minilm_store  # noqa: F401

from sparsecode.data.source import SourceConfig, open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, train

M, STEPS, BATCH = 128, 120, 256


def run(store, tmp_path, method: str, **coder) -> tuple[dict, float]:
    """(result on 80 rows per code of the training split, restarts per step over the second half of training).

    The training split, not the held-out one: this store holds a few dozen documents, so its held-out tail is
    other documents, and codes of what only the training documents say go unused there (bench/vq_utilisation.py
    measures held-out use on a store of thousands of documents)."""
    source = SourceConfig(kind="store", path=str(store), heldout=0.25)
    cfg = TrainConfig(method=method, coder={"m": M, **coder}, source=source, steps=STEPS, batch_size=BATCH,
                      lr=3e-3, log_every=1, ckpt_every=10**9, init_rows=4096)
    coder_ = train(cfg, tmp_path / method)
    log = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    churn = [r.get("restarts", 0.0) for r in log if r["step"] > STEPS // 2]
    return evaluate(coder_, open_source(source, "train"), rows=80 * M, details=False), sum(churn) / len(churn)


ALONE = pytest.mark.slow  # each remedy alone (the defaults use both)


@pytest.mark.parametrize("method,options", [
    ("vq", {}), ("simvq", {}), ("frozen_projector", {}), ("vqbridge", {}),
    pytest.param("simvq", {"init": "random"}, marks=ALONE),  # restarts alone rescue the papers' starts
    pytest.param("vqbridge", {"init": "zero"}, marks=ALONE),
    pytest.param("simvq", {"restart_after": 0}, marks=ALONE),  # and so does the k-means start alone
    pytest.param("vqbridge", {"restart_after": 0}, marks=ALONE),
], ids=["vq", "simvq", "frozen_projector", "vqbridge", "simvq-random-start", "vqbridge-zero-start",
        "simvq-no-restarts", "vqbridge-no-restarts"])
def test_every_code_is_used_on_minilm(minilm_store, tmp_path, method, options):  # noqa: F811
    result, churn = run(minilm_store, tmp_path, method, **options)
    assert result["utilisation"] >= 0.99, result["utilisation"]
    assert churn <= 0.01 * M, churn
    assert result["fvu"] < 0.6, result["fvu"]


@pytest.mark.parametrize("method,paper", [("simvq", {"init": "random", "restart_after": 0}),
                                          ("vqbridge", {"init": "zero", "restart_after": 0})])
def test_the_papers_starts_collapse_on_minilm(minilm_store, tmp_path, method, paper):  # noqa: F811
    result, _ = run(minilm_store, tmp_path, method, **paper)
    assert result["utilisation"] < 0.8, result["utilisation"]


def test_error_drawn_restarts_churn_where_splits_settle(minilm_store, tmp_path):  # noqa: F811
    """Restarts onto rows drawn ∝ their error (the old rule) keep moving codes that die again."""
    _, split = run(minilm_store, tmp_path, "vq", restart_after=8)
    _, error = run(minilm_store, tmp_path / "e", "vq", restart_after=8, restart_to="error")
    assert error > 3 * split and error > 0.01 * M, (error, split)


@pytest.mark.parametrize("method", ["simvq", "frozen_projector"])
def test_refined_offsets_reconstruct_better_on_minilm(minilm_store, tmp_path, method):  # noqa: F811
    """Offsets refined toward their rows' means beat offsets frozen where the start and the restarts put them
    (the papers' codes move only with the shared map), at the same utilisation."""
    refined, _ = run(minilm_store, tmp_path, method)
    frozen, _ = run(minilm_store, tmp_path / "frozen", method, refine=0.0)
    assert refined["fvu"] < frozen["fvu"] - 0.01 and refined["utilisation"] >= 0.99


def test_restarts_act_in_a_run_shorter_than_their_wait(minilm_store, tmp_path):  # noqa: F811
    """A codebook whose restart wait (restart_after·m rows) is longer than the run still restarts its unused codes in
    the run's first half: the wait is capped at a quarter of the run (dead_tokens). Uncapped, nothing restarts. The
    codes start at random, so the restarts alone bring them into use."""
    source = SourceConfig(kind="store", path=str(minilm_store), heldout=0.25)
    m, steps = 1024, 60  # 15,360 rows: less than restart_after·m = 16,384
    result, restarts = {}, {}
    for name, extra in (("capped", {}), ("uncapped", {"dead_tokens": 10**9})):
        cfg = TrainConfig(method="vq", coder={"m": m, "init": "random", **extra}, source=source, steps=steps,
                          batch_size=BATCH, lr=3e-3, log_every=1, ckpt_every=10**9)
        coder_ = train(cfg, tmp_path / name)
        log = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        restarts[name] = sum(r.get("restarts", 0.0) for r in log if r["step"] <= steps // 2)
        result[name] = evaluate(coder_, open_source(source, "train"), rows=16 * m, details=False)
    assert restarts["uncapped"] == 0 and restarts["capped"] > 0.05 * m, restarts
    assert result["capped"]["utilisation"] > 0.5 > result["uncapped"]["utilisation"], result


def test_a_kmeans_start_on_more_rows_per_code_fits_unseen_rows_better(minilm_store):  # noqa: F811
    """The k-means start on KMEANS_ROWS_PER_CODE rows per code (the trainer's default sample for codebooks) quantizes
    rows it has not seen better than one on 2 per code, which fits its own sample closely and new rows poorly."""
    from sparsecode.coder import build
    from sparsecode.metrics import fvu
    from sparsecode.vq.base import KMEANS_ROWS_PER_CODE

    m = 512
    rows = open_source(SourceConfig(kind="store", path=str(minilm_store), heldout=0.25), "train")
    x = rows.next_batch(KMEANS_ROWS_PER_CODE * m + 16 * m).float()
    unseen = x[KMEANS_ROWS_PER_CODE * m:]
    error = {}
    for per_code in (2, KMEANS_ROWS_PER_CODE):
        coder_ = build("vq", {"m": m, "d_in": x.shape[1]})
        coder_.init_from_data(x[: per_code * m])
        error[per_code] = fvu(unseen, coder_.decode(coder_.encode(unseen))).item()
    assert error[KMEANS_ROWS_PER_CODE] < 0.85 * error[2], error
