"""SimVQ's starts: init=data makes the codebook a Gaussian cloud with the data's mean and (scaled) covariance."""

import torch

from sparsecode.coder import build
from sparsecode.vq.base import covariance_root


def test_covariance_root_squares_to_the_covariance():
    x = torch.randn(5000, 6) @ torch.randn(6, 6)
    root = covariance_root(x - x.mean(0))
    torch.testing.assert_close(root @ root, torch.cov(x.t()), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(root, root.t())


def test_codes_start_with_the_data_shape_at_init_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=g) * torch.tensor([5.0, 1.0, 1.0, 0.2]) + 3.0
    for scale in (1.0, 0.3):
        simvq = build("simvq", {"d_in": 4, "m": 20000, "init": "data", "init_scale": scale})
        simvq.init_from_data(x)
        codes = simvq.current_codes()
        torch.testing.assert_close(codes.mean(0), x.mean(0), atol=0.15, rtol=0)
        torch.testing.assert_close(codes.std(0), scale * x.std(0), rtol=0.05, atol=0)
