import math

import pytest
import torch
from sae_helpers import run

from sparsecode.coder import build


@pytest.mark.parametrize("param", ["direct", "log"])
def test_pseudo_derivatives_of_the_threshold(param):
    """∂z/∂θ = −(θ/ε)·K((pre−θ)/ε) and ∂L0/∂θ = −(1/ε)·K(...), K the rectangle of width 1; through log θ the
    chain rule multiplies both by θ."""
    eps, theta = 0.1, 0.5
    sae = build("jumprelu", {"d_in": 2, "m": 3, "bandwidth": eps, "theta_init": theta, "l0_coef": 1.0,
                             "theta_param": param})
    trained = sae.log_theta if param == "log" else sae.theta
    chain = theta if param == "log" else 1.0
    with torch.no_grad():  # pre-activations 0.52 (inside the window), 0.9 and 0.2 (outside)
        sae.W_enc.copy_(torch.tensor([[0.52, 0.0], [0.9, 0.0], [0.2, 0.0]]))
    x = torch.tensor([[1.0, 0.0]])
    out = sae(x)
    out.losses["l0"].backward()
    torch.testing.assert_close(trained.grad, torch.tensor([-chain / eps, 0.0, 0.0]))
    assert out.code.l0().item() == 2  # 0.52 and 0.9 pass θ = 0.5
    sae.zero_grad()
    z = sae(x).code.values.sum()
    z.backward()
    torch.testing.assert_close(trained.grad, torch.tensor([-chain * theta / eps, 0.0, 0.0]))
    assert math.isclose(sae.W_enc.grad[2].abs().sum().item(), 0.0)  # below θ: no gradient


def test_jumprelu_trains_to_sparse_codes_with_low_fvu_by_raising_its_thresholds():
    """Under the L0 penalty every θ rises from θ_init = 0.1 (measured: min 0.29, mean 0.51, L0 1.5); without it a
    third of them fall to 0 and L0 is 30× higher (46)."""
    sae, r = run("jumprelu", {"l0_coef": 0.03})
    free, r_free = run("jumprelu", {"l0_coef": 0.0}, check_reload=False)
    assert r["fvu"] < 0.25, r
    assert r["l0"] < 5, r
    assert sae.theta.min() > 0.2 and sae.theta.mean() > 0.4, sae.theta
    assert (free.theta < 0.05).float().mean() > 0.25, free.theta
    assert r_free["l0"] > 10 * r["l0"], (r_free, r)
