import torch
from sae_helpers import run

from sparsecode.coder import build
from sparsecode.sae.mp import matching_pursuit


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
