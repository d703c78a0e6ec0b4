import tempfile
from pathlib import Path

import torch
from conftest import vq_config

from sparsecode.checkpoint import load_coder
from sparsecode.coder import build
from sparsecode.data.source import open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import train
from sparsecode.vq.kmeans import kmeans
from sparsecode.vq.search import nearest


def run(cfg):
    with tempfile.TemporaryDirectory() as d:
        vq = train(cfg, Path(d))
        return vq, evaluate(vq, open_source(cfg.source, "eval"), rows=16384), load_coder(Path(d))


def test_chunked_search_equals_brute_force_within_budget():
    x, codes = torch.randn(300, 8), torch.randn(1000, 8)
    ref = torch.cdist(x, codes).argmin(1)
    for budget in (1, 97, 5000, 1 << 24):
        assert torch.equal(nearest(x, codes, budget=budget), ref)
    ref_cos = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(codes, dim=1).t()).argmax(1)
    assert torch.equal(nearest(x, codes, "cosine", budget=500), ref_cos)


def test_kmeans_finds_separated_centres():
    centres = torch.randn(8, 5) * 10
    x = centres.repeat(50, 1) + 0.01 * torch.randn(400, 5)
    found = kmeans(x, 8, iters=10, generator=torch.Generator().manual_seed(0))
    assert torch.cdist(centres, found).min(1).values.max() < 0.1


def test_straight_through_gradient_and_commitment():
    vq = build("vq", {"d_in": 4, "m": 8}).eval()  # no EMA update, so decode(code) is still x_hat
    x = torch.randn(16, 4, requires_grad=True)
    out = vq(x)
    torch.testing.assert_close(out.x_hat, vq.decode(out.code))
    out.x_hat.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # identity gradient through the quantizer
    assert out.losses["commit"].requires_grad


def test_ema_moves_codes_to_cluster_means():
    vq = build("vq", {"d_in": 2, "m": 2, "decay": 0.5, "restart_after": 0})
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        vq.ema_sum.copy_(vq.codebook)
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0], [-3.0, 0.0]])
    vq.train()
    for _ in range(30):
        vq(x)
    torch.testing.assert_close(vq.codebook, torch.tensor([[2.0, 0.0], [-3.0, 0.0]]), atol=1e-3, rtol=0)


def test_vq_uses_codes_and_finds_centres():
    """Acceptance: K=256 on 256 clusters → ≥ 95% of codes used, centres found (mean best cos > 0.95)."""
    vq, result, loaded = run(vq_config())
    assert result["utilisation"] >= 0.95, result
    assert result["mean_best_cos"] > 0.95, result
    x = open_source(vq_config().source, "eval").next_batch(512)
    assert torch.equal(vq.encode(x).indices, loaded.encode(x).indices)


def test_restarts_raise_utilisation():
    """Acceptance: from a random (non k-means) init, restarts on beat restarts off."""
    _, on, _ = run(vq_config(coder={"init": "random"}))
    _, off, _ = run(vq_config(coder={"init": "random", "restart_after": 0}))
    assert on["utilisation"] >= 0.95
    assert off["utilisation"] < 0.5 * on["utilisation"], (on, off)


def test_cosine_and_gradient_trained_codebooks():
    for coder in ({"metric": "cosine"}, {"ema": False}):
        _, result, _ = run(vq_config(coder=coder, lr=1e-2))
        assert result["utilisation"] >= 0.9, (coder, result)
        assert result["mean_best_cos"] > 0.95, (coder, result)


def test_restarts_wait_for_expected_hits_so_a_used_codebook_does_not_churn():
    """A code restarts after restart_after·m rows unused: uniform usage of m=4096 codes with 512-row batches
    (one hit per code every 8 steps) restarts about m·e^-8 ≈ 1.4 codes by bad luck, while a code that is
    never hit restarts on time (a rule of 10 idle steps would restart ~29% of the codebook)."""
    m, batch = 4096, 512
    vq = build("vq", {"d_in": 8, "m": m, "init": "random", "restart_after": 8}).train()
    never = 0  # code 0 is never picked: the data is drawn from the other codes
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(m, 8) * 10)
        vq.ema_sum.copy_(vq.codebook)
    g = torch.Generator().manual_seed(0)
    restarts, restarted_at = [], None
    for step in range(1, 8 * m // batch + 9):
        rows = torch.randint(1, m, (batch,), generator=g)
        out = vq(vq.codebook[rows] + 1e-3 * torch.randn(batch, 8, generator=g))
        restarts.append(out.stats["restarts"])
        if restarted_at is None and vq.since_fired[never] == 0:
            restarted_at = step
    assert restarted_at == 8 * m // batch  # exactly when restart_after·m rows have passed
    assert sum(restarts) <= 8, sum(restarts)


def test_restarts_move_at_most_one_code_per_batch_row_onto_distinct_rows():
    vq = build("vq", {"d_in": 4, "m": 64, "init": "random", "restart_after": 1}).train()
    vq.since_fired.fill_(10**6)  # every code long dead
    x = torch.randn(16, 4)
    idx = torch.randint(64, (16,))
    assert vq.restart(x, idx, vq.codebook[idx]) == 16
    moved = vq.codebook[vq.since_fired == 0]
    assert moved.shape[0] == 16 and torch.unique(moved, dim=0).shape[0] == 16
