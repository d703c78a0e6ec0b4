import torch

from sparsecode.diagnose import active_units, neural_collapse


def etf_data(c=8, d=32, per_class=200, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    etf = (torch.eye(c) - 1 / c) * (c / (c - 1)) ** 0.5  # simplex ETF in R^c
    basis, _ = torch.linalg.qr(torch.randn(d, c, generator=g))
    means = 3.0 * etf @ basis.t() + torch.randn(d, generator=g)  # rotated, scaled, shifted
    labels = torch.arange(c).repeat_interleave(per_class)
    return means[labels] + noise * torch.randn(len(labels), d, generator=g), labels


def test_collapsed_set_is_near_collapsed_values():
    h, y = etf_data()
    nc = neural_collapse(h, y)
    assert nc["nc1"] < 1e-4
    assert nc["nc2_equinorm"] < 1e-3 and nc["nc2_equiangular"] < 1e-3
    assert nc["nc3"] < 0.05 and nc["nc4"] == 0 and nc["accuracy"] == 1


def test_uncollapsed_set_is_clearly_not():
    g = torch.Generator().manual_seed(1)
    c, d = 8, 32
    means = torch.randn(c, d, generator=g) * torch.rand(c, 1, generator=g) * 2
    y = torch.arange(c).repeat_interleave(200)
    h = means[y] + 2.0 * torch.randn(len(y), d, generator=g)  # overlapping classes
    nc = neural_collapse(h, y)
    assert nc["nc1"] > 0.1  # collapsed: < 1e-4
    assert nc["nc2_equinorm"] > 0.1 and nc["nc2_equiangular"] > 0.05
    assert nc["nc3"] > 0.3 and nc["nc4"] > 0.01


def test_nc1_hand_computed_two_classes():
    # two classes at ±1 on axis 0, within-class spread ±0.5 on axis 0 → Σ_W = 0.25, Σ_B = 1 → NC1 = 0.25 / 2
    h = torch.tensor([[1.5, 0.0], [0.5, 0.0], [-0.5, 0.0], [-1.5, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert abs(neural_collapse(h, y)["nc1"] - 0.125) < 1e-9


def test_wide_features_match_narrow_ones():
    h, y = etf_data(noise=0.3)
    wide = torch.cat([h, torch.zeros(len(h), 500)], 1)  # e.g. dense codes with unused latents
    a, b = neural_collapse(h, y), neural_collapse(wide, y)
    for key in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc4"):
        assert abs(a[key] - b[key]) < 1e-6, key


def test_active_units_half_forced_to_prior():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    w[4:] = 0  # dims 4..7: posterior mean is the prior's (0) whatever the input
    mu = x @ w.t()
    logvar = torch.zeros_like(mu)
    logvar[:, :4] = -2.0
    au = active_units(mu, logvar)
    assert au["active_units"] == 4 and au["active_share"] == 0.5 and au["passive"] == [4, 5, 6, 7]
    assert all(k < 1e-9 for k in au["kl_per_dim"][4:]) and all(k > 0.5 for k in au["kl_per_dim"][:4])


def test_evaluate_reports_posterior_collapse_of_a_variational_sae():
    from sparsecode.coder import build
    from sparsecode.data.source import TensorSource
    from sparsecode.evaluate import evaluate

    vsae = build("vsae", {"d_in": 16, "m": 32, "k": 4})
    with torch.no_grad():
        vsae.W_enc[16:] = 0  # latents 16..31: posterior mean fixed at b_enc = 0, the prior's mean
        vsae.W_var[16:] = 0
        vsae.b_var[16:] = 0  # and unit variance: q(z_i|x) = N(0, 1) exactly
    result = evaluate(vsae, TensorSource(torch.randn(2048, 16)), rows=2048)
    post = result["posterior"]
    assert post["active_units"] == 16 and post["passive"] == list(range(16, 32))
    assert max(post["kl_per_dim"][16:]) < 1e-12 < min(post["kl_per_dim"][:16])
