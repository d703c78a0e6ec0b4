import torch
from sae_helpers import run

from sparsecode.coder import build


def test_vsae_samples_in_training_and_is_deterministic_in_encode():
    sae = build("vsae", {"d_in": 16, "m": 64, "k": 4, "logvar_init": 0.0})
    sae.generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16)
    sae.train()
    a, b = sae(x), sae(x)
    assert "kl" in a.losses and not torch.equal(a.x_hat, b.x_hat)  # noise differs between draws
    sae.eval()
    c1, c2 = sae.encode(x), sae.encode(x)
    assert torch.equal(c1.indices, c2.indices) and torch.equal(c1.values, c2.values)


def test_kl_is_zero_at_the_prior():
    sae = build("vsae", {"d_in": 16, "m": 64, "k": 4, "logvar_init": 0.0})
    with torch.no_grad():
        sae.W_enc.zero_()
    sae.train()
    x = torch.randn(8, 16)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    assert sae(x).losses["kl"].abs().item() < 1e-6


def test_vsae_trains_to_low_fvu():
    _, r = run("vsae", {"k": 4})
    assert r["fvu"] < 0.2, r
    assert 2.5 < r["l0"] <= 4.0, r
