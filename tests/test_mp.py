import torch
from sae_helpers import run

from sparsecode.coder import build
from sparsecode.sae.mp import matching_pursuit, use_gram


def test_matching_pursuit_steps():
    atoms = torch.nn.functional.normalize(torch.randn(10, 6), dim=1)
    r0 = torch.randn(4, 6)
    idx, val, r = matching_pursuit(r0, atoms, 1)
    scores = r0 @ atoms.t()
    assert torch.equal(idx[:, 0], scores.argmax(1))
    torch.testing.assert_close(val[:, 0], scores.max(1).values)
    torch.testing.assert_close((r * atoms[idx[:, 0]]).sum(1), torch.zeros(4), atol=1e-6, rtol=0)
    idx, val, r = matching_pursuit(r0, atoms, 5, signed=True)
    x_hat = (val[..., None] * atoms[idx.clamp_min(0)]).sum(1)
    torch.testing.assert_close(x_hat + r, r0)


def test_mp_sae_decodes_to_input_minus_residual_and_has_no_encoder():
    sae = build("mp", {"d_in": 16, "m": 64, "k": 5})
    assert not hasattr(sae, "W_enc")
    x = torch.randn(8, 16)
    code = sae.encode(x)
    _, _, r = matching_pursuit(x - sae.b_dec, sae.W_dec, 5)
    torch.testing.assert_close(sae.decode(code), x - r)


def test_mp_sae_trains_end_to_end_and_recovers_features():
    """Low FVU, ≥ 90% of the true features recovered, and every row uses all k = 4 pursuit steps (L0 = 4.0)."""
    _, r = run("mp", {"k": 4})
    assert r["fvu"] < 0.1, r
    assert r["l0"] > 3.95, r
    assert r["recovered"] >= 0.9, r


def reference_mp(r, atoms, steps, signed=False):
    """The first implementation: picks and weights read from one differentiable [B, m] score matrix a round."""
    indices, values = [], []
    for _ in range(steps):
        scores = r @ atoms.t()
        key = scores.detach().abs() if signed else scores.detach()
        best = key.argmax(1, keepdim=True)
        a = scores.gather(1, best)
        live = (key.gather(1, best) > 0) if not signed else (a.detach() != 0)
        a = a * live
        r = r - a * atoms[best[:, 0]]
        indices.append(best.masked_fill(~live, -1))
        values.append(a)
    return torch.cat(indices, 1), torch.cat(values, 1), r


def test_fast_paths_agree_with_the_reference_in_picks_weights_and_gradients():
    """No-autograd scores and the Gram update: the reference's picks, weights, residual and gradients."""
    g = torch.Generator().manual_seed(0)
    atoms0 = torch.nn.functional.normalize(torch.randn(256, 32, generator=g), dim=1)
    r0 = torch.randn(64, 32, generator=g) + 0.5 * atoms0[:64]
    for signed in (False, True):
        outs, grads = [], []
        for fn in (reference_mp, matching_pursuit, lambda *a, **kw: matching_pursuit(*a, gram=True, **kw)):
            r, atoms = r0.clone().requires_grad_(), atoms0.clone().requires_grad_()
            idx, val, res = fn(r, atoms, 24, signed=signed)
            (val.pow(2).sum() + (res * torch.linspace(-1, 1, 32)).sum()).backward()
            outs.append((idx, val, res))
            grads.append((r.grad, atoms.grad))
        (idx_ref, val_ref, res_ref), (gr_ref, ga_ref) = outs[0], grads[0]
        assert (idx_ref >= 0).all()  # every row uses all 24 steps: each one is compared
        for (idx, val, res), (gr, ga) in zip(outs[1:], grads[1:], strict=True):
            assert torch.equal(idx, idx_ref)
            torch.testing.assert_close(val, val_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(res, res_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gr, gr_ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ga, ga_ref, atol=1e-4, rtol=1e-4)


def test_mp_sae_takes_the_gram_path_where_it_is_cheaper_with_the_same_code():
    sae = build("mp", {"d_in": 16, "m": 64, "k": 5})
    x = torch.randn(256, 16)
    assert use_gram(64, 256, 5, sae.cfg.gram_budget) and not use_gram(64, 8, 5, sae.cfg.gram_budget)
    assert not use_gram(64, 256, 5, 64 * 64 - 1)
    code = sae.encode(x)
    idx, val, _ = reference_mp(x - sae.b_dec, sae.W_dec, 5)
    assert torch.equal(code.indices, idx)
    torch.testing.assert_close(code.values, val, atol=1e-5, rtol=1e-5)
