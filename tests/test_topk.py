import tempfile
from pathlib import Path

import pytest
import torch
from conftest import topk_config
from sae_helpers import one_thread

from sparsecode.checkpoint import load_coder
from sparsecode.coder import build
from sparsecode.data.source import open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import train


def small(**kw):
    return build("topk", {"d_in": 16, "m": 64, "k": 4, **kw})


def test_init_encoder_is_decoder_transpose_with_unit_rows():
    sae = small()
    assert torch.equal(sae.W_enc, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_encode_keeps_k_largest_relu_preacts():
    sae = small()
    x = torch.randn(8, 16)
    code = sae.encode(x)
    pre = sae.pre_acts(x).relu()
    assert code.indices.shape == (8, 4)
    ref = pre.topk(4, dim=1).values
    torch.testing.assert_close(code.values.sort(dim=1).values, ref.sort(dim=1).values)


def test_parallel_gradient_removed_and_rows_renormalised():
    sae = small()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.after_backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.after_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_auxk_only_with_dead_latents_and_it_trains_them():
    sae = small(dead_tokens=10)
    x = torch.randn(32, 16)
    sae.train()
    assert "auxk" not in sae(x).losses  # nothing dead yet
    sae.since_fired[:32] = 100  # half the latents dead
    out = sae(x)
    assert out.losses["auxk"] > 0
    out.losses["auxk"].backward()
    dead_grad = sae.W_dec.grad[:32].abs().sum(1)
    assert (dead_grad > 0).sum() > 0  # AuxK reaches dead latents' atoms


def test_track_resets_fired_latents():
    sae = small()
    sae.train()
    x = torch.randn(10, 16)
    out = sae(x)
    fired = out.code.counts() > 0
    assert (sae.since_fired[fired] == 0).all()
    assert (sae.since_fired[~fired] == 10).all()


def test_topk_recovers_superposed_features():
    """Acceptance: d=64, n=256, m=512, k=6 (2× the mean 3 active) → FVU < 0.10, ≥ 90% recovered; rows without a
    feature (5%) get an empty code, the others nearly all k latents (5.72 on average measured)."""
    cfg = topk_config()
    with tempfile.TemporaryDirectory() as d, one_thread():
        sae = train(cfg, Path(d))
        result = evaluate(sae, open_source(cfg.source, "eval"), rows=16384)
        assert result["fvu"] < 0.10, result
        assert result["recovered"] >= 0.90, result
        x, coef = open_source(cfg.source, "eval").sample(4096)
        l0, empty = sae.encode(x).l0().float(), (coef == 0).all(1)
        assert 0.03 < empty.float().mean() < 0.08 and (l0[empty] == 0).all(), (empty.float().mean(), l0[empty])
        assert l0[~empty].mean() > 5.5, l0[~empty].mean()
        loaded = load_coder(Path(d))
        x = open_source(cfg.source, "eval").next_batch(256)
        a, b = sae.encode(x), loaded.encode(x)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("method", ["topk", "batchtopk", "abstopk", "matryoshka"])
def test_sparse_gradient_path_matches_the_dense_reference(method):
    """Values and every parameter gradient (AuxK included) within 1e-5 of the dense autograd path."""
    torch.manual_seed(3)
    x = torch.randn(64, 16)
    grads = []
    for sparse in (True, False):
        torch.manual_seed(4)
        sae = build(method, {"d_in": 16, "m": 64, "k": 4, "sparse_grad": sparse, "dead_tokens": 10}).train()
        sae.since_fired[:20] = 100  # some dead latents, so AuxK takes part
        out = sae(x)
        sum(out.losses.values()).backward()
        grads.append((out.x_hat.detach(), {n: p.grad for n, p in sae.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], atol=1e-5, rtol=1e-5)
