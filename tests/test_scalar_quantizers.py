"""fsq, lfq and latentquant: every implicit code reachable, straight-through gradients, real fits, reload."""

import itertools
import math

import pytest
import torch
from sae_helpers import one_thread
from vq_helpers import clusters, run

from sparsecode.coder import build
from sparsecode.data.source import open_source
from sparsecode.metrics import perplexity


def level_grid(coder) -> list[torch.Tensor]:
    """Each dimension's quantized values, lowest level first."""
    if coder.name == "fsq":
        return [torch.arange(n) / ((n - 1) / 2) - 1 for n in coder.levels()]
    if coder.name == "latentquant":
        return list(coder.codebooks.detach())
    return [torch.tensor([-1.0, 1.0] if coder.cfg.mode == "sign" else [0.0, 1.0])] * coder.cfg.m


def assert_on_grid(coder, values: torch.Tensor) -> None:
    """Every value is its dimension's grid value at its level index (a value left unquantized fails)."""
    idx = coder.level_index(values)
    for j, grid in enumerate(level_grid(coder)):
        torch.testing.assert_close(values[:, j], grid[idx[:, j]], atol=1e-6, rtol=0)


def inputs_for(coder, z: torch.Tensor) -> torch.Tensor:
    """Rows x whose projection W_in (x − b_out) + b_in is exactly z (least squares; d_in ≥ m)."""
    target = (z - coder.b_in.detach()).t()
    return torch.linalg.lstsq(coder.W_in.detach(), target).solution.t() + coder.b_out.detach()


def test_fsq_reaches_every_implicit_code():
    fsq = build("fsq", {"d_in": 8, "levels": [3, 4, 5]}).eval()
    levels = torch.tensor([3.0, 4.0, 5.0])
    half = (levels - 1) / 2
    grid = torch.tensor(list(itertools.product(range(3), range(4), range(5))), dtype=torch.float32)
    z = torch.atanh(0.999 * (grid - half) / half)  # the middle of each level's rounding interval
    ids = fsq.code_ids(fsq.encode(inputs_for(fsq, z)))
    assert fsq.implicit_size() == 60
    assert torch.equal(ids.sort().values, torch.arange(60))


def test_latentquant_reaches_every_entry_of_every_dimension():
    lq = build("latentquant", {"d_in": 8, "m": 3, "values": 4}).eval()
    with torch.no_grad():
        lq.codebooks.copy_(torch.randn(3, 4).sort(1).values)
    grid = torch.tensor(list(itertools.product(range(4), repeat=3)))
    z = lq.codebooks.detach().gather(1, grid.t()).t()
    ids = lq.code_ids(lq.encode(inputs_for(lq, z)))
    assert torch.equal(ids.sort().values, torch.arange(64))


def test_lfq_reaches_every_bit_pattern():
    for mode in ("sign", "bernoulli"):
        lfq = build("lfq", {"d_in": 8, "m": 5, "mode": mode}).eval()
        bits = torch.tensor(list(itertools.product([0, 1], repeat=5)), dtype=torch.float32)
        ids = lfq.code_ids(lfq.encode(inputs_for(lfq, 2 * bits - 1)))
        assert torch.equal(ids.sort().values, torch.arange(32)), mode


@pytest.mark.parametrize("method,opts,soft", [
    ("fsq", {"levels": [5, 4, 3]}, lambda c, z: torch.tanh(z)),  # FSQ without rounding (odd and even L)
    ("latentquant", {"m": 3}, lambda c, z: z),  # identity surrogate
    ("lfq", {"m": 3}, lambda c, z: z),
    ("lfq", {"m": 3, "mode": "bernoulli"}, lambda c, z: torch.sigmoid(z)),
])
def test_straight_through_gradient_equals_the_surrogates(method, opts, soft):
    coder = build(method, {"d_in": 6, **opts})
    x = torch.randn(32, 6)
    out = coder(x)
    assert not torch.equal(out.code.values, soft(coder, coder.project(x)))  # the forward really quantizes
    grad = torch.autograd.grad((out.x_hat * x).sum(), coder.W_in)[0]
    # the same loss through the un-quantized surrogate, decoding the quantized values' gradient path
    z = coder.project(x)
    q = soft(coder, z)
    expect = torch.autograd.grad(((q @ coder.W_out + coder.b_out) * x).sum(), coder.W_in)[0]
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, expect)


def test_latentquant_losses_train_codebooks_and_decay_weights():
    lq = build("latentquant", {"d_in": 6, "m": 4})
    out = lq(torch.randn(64, 6))
    assert set(out.losses) == {"fvu", "quantization", "commitment", "weight_decay"}
    (g,) = torch.autograd.grad(out.losses["quantization"], lq.codebooks)
    assert g.abs().sum() > 0
    (g,) = torch.autograd.grad(out.losses["weight_decay"], lq.W_out)
    torch.testing.assert_close(g, 0.1 * 2 * lq.W_out.detach() / sum(
        w.numel() for w in (lq.W_in, lq.b_in, lq.W_out, lq.b_out)))


@pytest.mark.parametrize("method,coder,max_fvu", [
    ("fsq", {"levels": [8, 8, 8, 8, 8, 8]}, 0.35),
    ("latentquant", {"m": 6, "values": 8}, 0.35),
    ("lfq", {"m": 8}, 0.5),
    ("lfq", {"m": 8, "mode": "bernoulli"}, 0.5),
])
def test_fits_a_low_dimensional_cluster_set_and_reloads(method, coder, max_fvu):
    """16 clusters in 8 dims: m scalar codes explain most of the variance, every value on its dimension's level
    grid, ≥ 8 implicit codes in use; saved codes reload identically."""
    source = clusters(d=8, n_clusters=16, spread=0.05)
    with one_thread():
        trained, result = run(method, coder, source, steps=300, lr=1e-2, rows=8192)
    assert result["fvu"] < max_fvu, result
    code = trained.encode(open_source(source, "eval").next_batch(2048))
    assert_on_grid(trained, code.values)
    assert len(trained.code_ids(code).unique()) >= 8


def test_evaluate_counts_the_implicit_codebook():
    from sparsecode.coder import build
    from sparsecode.data.source import TensorSource
    from sparsecode.evaluate import evaluate

    """implicit_used and implicit_perplexity are those of the distinct tuples of levels in the encoded rows."""
    fsq = build("fsq", {"d_in": 4, "levels": [3, 3]})
    x = torch.randn(4096, 4) * 3
    result = evaluate(fsq, TensorSource(x), rows=4096)
    values = fsq.encode(x).values
    assert_on_grid(fsq, values)
    counts = fsq.level_index(values).unique(dim=0, return_counts=True)[1]
    assert result["implicit_codes"] == 9 and result["implicit_used"] == len(counts) == 9, result
    assert result["implicit_utilisation"] == 1.0
    assert math.isclose(result["implicit_perplexity"], perplexity(counts), rel_tol=1e-9), result
