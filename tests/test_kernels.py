import pytest
import torch

from sparsecode.kernels.sparse_encoder import bag_weight_grad, picked, pre_acts


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_picked_values_and_gradients_match_the_dense_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    b, d, m, k = 37, 12, 50, 5
    params = [torch.randn(b, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype),
              torch.randn(m, generator=g, dtype=dtype)]
    pre = pre_acts(*params)
    vals, idx = pre.topk(k, dim=1)
    upstream = torch.randn(b, k, generator=g, dtype=dtype)
    grads = []
    for fast in (True, False):
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = picked(*leaves, idx, vals, fast=fast)
        torch.testing.assert_close(out, vals, atol=tol, rtol=tol)
        (out * upstream).sum().backward()
        grads.append([p.grad for p in leaves])
    for fast_g, ref_g in zip(*grads, strict=True):
        torch.testing.assert_close(fast_g, ref_g, atol=tol * 10, rtol=tol * 10)


def test_repeated_indices_accumulate():
    xc, w, bias = torch.randn(2, 3), torch.randn(4, 3, requires_grad=True), torch.zeros(4, requires_grad=True)
    idx = torch.tensor([[1, 1], [1, 2]])
    vals = pre_acts(xc, w, bias).gather(1, idx)
    picked(xc, w, bias, idx, vals).sum().backward()
    torch.testing.assert_close(w.grad[1], 2 * xc[0] + xc[1])
    torch.testing.assert_close(bias.grad, torch.tensor([0.0, 3.0, 1.0, 0.0]))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_cuda_weight_gradient_matches_the_sparse_product(dtype, tol):
    """The encoder weight gradient of the CUDA path (embedding_bag's backward, no host sync) equals the CPU
    path's sparse product Gᵀ·xc, repeated indices included."""
    g = torch.Generator().manual_seed(1)
    b, d, m, k = 37, 12, 50, 5
    idx = torch.randint(0, m, (b, k), generator=g)
    grad, xc = torch.randn(b, k, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype)
    rows = torch.arange(b).repeat_interleave(k)
    dense_g = torch.zeros(m, b, dtype=dtype).index_put_((idx.reshape(-1), rows), grad.reshape(-1), accumulate=True)
    torch.testing.assert_close(bag_weight_grad(idx, grad, xc, torch.zeros(m, d, dtype=dtype)), dense_g @ xc,
                               atol=tol, rtol=tol)
