import torch
from sae_helpers import run

from sparsecode.coder import build


def test_l1_weights_each_latent_by_its_decoder_norm_and_rows_stay_free():
    sae = build("relu", {"d_in": 16, "m": 64, "l1_coef": 1.0})
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), 0.1))  # init_norm
    torch.testing.assert_close(sae.W_enc, sae.W_dec)  # the encoder starts as the decoder's transpose
    x = torch.randn(32, 16)
    l1 = sae(x).losses["l1"]
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    assert torch.allclose(sae(x).losses["l1"], 2 * l1)
    sae.after_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), 0.2))


def test_relu_sae_trains_sparse_with_low_fvu():
    _, r = run("relu", {"l1_coef": 0.3})
    assert r["fvu"] < 0.25, r
    assert r["l0"] < 12, r  # L1 makes it sparse; unpenalised it would fire ~half of 128 latents
    assert r["recovered"] >= 0.5, r
