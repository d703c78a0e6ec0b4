"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping ahead"; Gemma Scope): z = pre · H(pre − θ), L0 penalty.

Reading of the pseudo-derivatives (the paper's straight-through estimators, as in its reference code
and SAELens): with the rectangle kernel K(u) = 1{|u| < ½} and bandwidth ε,
  ∂JumpReLU(pre; θ)/∂θ = −(θ/ε) · K((pre − θ)/ε),   ∂H(pre − θ)/∂θ = −(1/ε) · K((pre − θ)/ε),
and neither passes a gradient to `pre` through the step (pre gets the plain gradient where z = pre).
θ = exp(log θ) per latent (autograd chains through exp). Loss = FVU + λ · mean_b L0_b.

The encoder is dense. A training step keeps z as [B, m] (its code has all m slots, x̂ is one matmul), so it
never reads a width back from the device; the reconstruction's gradient reaches the latents that fire (z ≠ 0),
as it did through the packed code; `encode` packs the non-zeros (`select.threshold`), which reads the
busiest row's count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code
from ..coder import CoderConfig, Output, register
from ..config import non_negative, positive
from .base import SAE
from .select import threshold


def _rect(u: Tensor) -> Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        g_theta = -(theta / ctx.eps) * _rect((pre - theta) / ctx.eps) * grad
        return grad * (pre > theta), g_theta.sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        g_theta = -(1.0 / ctx.eps) * _rect((pre - theta) / ctx.eps) * grad
        return torch.zeros_like(pre), g_theta.sum(0), None


@dataclass
class JumpReLUConfig(CoderConfig):
    l0_coef: float = 0.01  # λ of the L0 penalty (per row, next to FVU)
    bandwidth: float = 0.05  # ε of the rectangle kernel, in pre-activation units
    theta_init: float = 0.1
    center_input: bool = True  # the encoder reads x − b_dec (False: x itself, as some imported SAEs do)

    def validate(self) -> None:
        super().validate()
        non_negative(self, "l0_coef")
        positive(self, "bandwidth", "theta_init")


@register("jumprelu")
class JumpReLUSAE(SAE):
    """Per-latent learned thresholds θ; a latent is active where its pre-activation exceeds θ."""

    config_class = JumpReLUConfig
    data_parallel = True

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.log_theta = nn.Parameter(torch.full((cfg.m,), math.log(cfg.theta_init)))
        # the θ `encode` compares with: exp(log θ) after every step, or exactly what an imported file holds
        self.register_buffer("theta", self.log_theta.detach().exp())

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return threshold(self.pre_acts(x), self.theta, self.cfg.m)

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        pre, theta = self.pre_acts(x), self.log_theta.exp()
        z = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        z = z * (z != 0)  # gradient only where a latent fires, as through the packed code of `encode`
        l0 = _Step.apply(pre, theta, self.cfg.bandwidth).sum(1).mean()
        return self.dense_output(x, z, l0=self.cfg.l0_coef * l0)  # full-width code, one-matmul decode

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        self.theta.copy_(self.log_theta.exp())

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        if prefix + "theta" not in state and prefix + "log_theta" in state:  # saved before θ was kept
            state[prefix + "theta"] = state[prefix + "log_theta"].exp()
        super()._load_from_state_dict(state, prefix, *args, **kwargs)
