"""Encoder pre-activations picked at k indices per row, with a sparse backward.

An SAE that keeps k of m pre-activations only needs gradients for those k: the dense backward of the
encoder matmul (two [B, m] × [m, d] products) becomes O(B·k·d) gathers and scatters. The forward matmul
stays dense (it has to score every latent) and runs without autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pre_acts(xc: Tensor, w_enc: Tensor, b_enc: Tensor) -> Tensor:
    """[B, m] dense pre-activations b_enc + xc·W_encᵀ, without autograd (scores for selection only)."""
    with torch.no_grad():
        return torch.addmm(b_enc, xc, w_enc.t())


def bag_weight_grad(idx: Tensor, grad: Tensor, xc: Tensor, w_enc: Tensor) -> Tensor:
    """dW = Gᵀ·xc ([m, d]) for G the [B, m] gradient holding `grad` at `idx`: embedding_bag's weight gradient
    with per-sample weights G and upstream xc. Its CUDA backward sorts and segments at fixed sizes, where a
    sparse COO product coalesces its matrix, whose size is read back from the device (a host sync)."""
    with torch.enable_grad():
        w = w_enc.detach().requires_grad_()
        bag = F.embedding_bag(idx, w, per_sample_weights=grad.to(w_enc.dtype), mode="sum")
        return torch.autograd.grad(bag, w, xc.to(w_enc.dtype))[0]


class _Picked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xc: Tensor, w_enc: Tensor, b_enc: Tensor, idx: Tensor, values: Tensor) -> Tensor:
        ctx.save_for_backward(xc, w_enc, idx)
        ctx.m = b_enc.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, w_enc, idx = ctx.saved_tensors
        grad = grad.to(w_enc.dtype)
        flat = idx.reshape(-1)
        g_xc = F.embedding_bag(idx, w_enc, per_sample_weights=grad, mode="sum") if ctx.needs_input_grad[0] else None
        g_w = g_b = None
        if ctx.needs_input_grad[1] and xc.is_cuda:  # the sparse product below would sync on CUDA
            g_w = bag_weight_grad(idx, grad, xc, w_enc)
        elif ctx.needs_input_grad[1]:
            # dW = Gᵀ·xc with G the [B, m] gradient holding k entries per row: a sparse-dense product
            # (index_add_ of B·k rows is several times slower on CPU)
            rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
            g_t = torch.sparse_coo_tensor(torch.stack([flat, rows]), grad.reshape(-1), (ctx.m, idx.shape[0]),
                                          check_invariants=False)
            g_w = torch.sparse.mm(g_t, xc.to(w_enc.dtype))
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(ctx.m, dtype=grad.dtype, device=grad.device).index_add_(0, flat, grad.reshape(-1))
        return g_xc, g_w, g_b, None, None


def picked(xc: Tensor, w_enc: Tensor, b_enc: Tensor, idx: Tensor, values: Tensor, fast: bool = True) -> Tensor:
    """[B, k] pre-activations at `idx` (their `values`, already gathered from pre_acts) as a differentiable
    function of xc, W_enc and b_enc. `fast=False` is the reference: a dense matmul under autograd."""
    if fast:
        return _Picked.apply(xc, w_enc, b_enc, idx, values)
    return torch.addmm(b_enc, xc, w_enc.t()).gather(1, idx)
