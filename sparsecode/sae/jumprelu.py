"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping ahead"; Gemma Scope): z = pre · H(pre − θ), L0 penalty.

Reading of the pseudo-derivatives (the paper's straight-through estimators, as in its reference code
and SAELens): with the rectangle kernel K(u) = 1{|u| < ½} and bandwidth ε,
  ∂JumpReLU(pre; θ)/∂θ = −(θ/ε) · K((pre − θ)/ε),   ∂H(pre − θ)/∂θ = −(1/ε) · K((pre − θ)/ε),
and neither passes a gradient to `pre` through the step (pre gets the plain gradient where z = pre).
Loss = FVU + λ · mean_b L0_b, or with `k` Gemma Scope 2's target: λ · mean_b (2/k)(L0_b − k)², which brings the
L0 to k where the plain penalty's L0 does not follow λ (θ stops where no pre-activation is near it). Atoms are
free and start at norm 0.1 with θ at 0.01 (SAELens's start), so the encoder's scale meets θ.
θ is trained directly and kept ≥ 0 (`theta_param="direct"`, SAELens's fix; `"log"` is the paper's log θ), at
`theta_lr` times the run's lr: Adam moves θ about lr a step, too slow for θ to reach the data's scale in a short
run under a decaying lr. With `d_out` it is a (skip) transcoder (SAELens's jumprelu_(skip_)transcoder): the FVU
is the target's.

The encoder is dense. A training step keeps z as [B, m] (its code has all m slots, x̂ is one matmul), so it
never reads a width back from the device; the reconstruction's gradient reaches the latents that fire (z ≠ 0),
as it did through the packed code; `encode` packs the non-zeros (`select.threshold`), which reads the
busiest row's count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code
from ..coder import CoderConfig, Output, register
from ..config import check, non_negative, positive
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
    l0_coef: float = 0.001  # λ of the L0 penalty (per row, next to FVU)
    k: int | None = None  # target L0: the penalty λ·(2/k)·(L0 − k)² per row (Gemma Scope 2); None: λ·L0
    bandwidth: float = 0.05  # ε of the rectangle kernel, in pre-activation units
    theta_init: float = 0.01
    init_norm: float = 0.1  # atoms (and the encoder, their transpose) start at this norm and are free to grow
    theta_lr: float = 3.0  # θ's lr, a multiple of the run's (Adam moves θ about lr a step)
    theta_param: str = "direct"  # direct: θ itself, clamped ≥ 0 | log: log θ (the paper's)
    center_input: bool = True  # the encoder reads x − b_dec (False: x itself, as some imported SAEs do)

    def validate(self) -> None:
        super().validate()
        non_negative(self, "l0_coef")
        check(self.k is None or 0 < self.k <= self.m, f"k must be in 1..m = {self.m} or null, got {self.k}")
        positive(self, "bandwidth", "theta_init", "init_norm", "theta_lr")
        check(self.theta_param in ("direct", "log"), f"theta_param must be direct or log, got {self.theta_param!r}")


@register("jumprelu")
class JumpReLUSAE(SAE):
    """Per-latent learned thresholds θ; a latent is active where its pre-activation exceeds θ."""

    config_class = JumpReLUConfig
    unit_atoms = False  # the scale between z and its atom is free, so pre-activations meet θ and its kernel
    crosscodes = True  # sites > 1: a crosscoder; its L0 penalty reads no decoder norm
    transcodes = True  # d_out > 0: a (skip) transcoder, its FVU the target's (SAELens's jumprelu_transcoder)
    data_parallel = True  # every batch statistic it keeps is reduced over the ranks

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        with torch.no_grad():  # small atoms at the start, as relu's
            self.W_dec.mul_(cfg.init_norm)
            self.W_enc.mul_(cfg.init_norm)
        start = torch.full((cfg.m,), float(cfg.theta_init))
        if cfg.theta_param == "log":  # the θ `encode` compares with: exp(log θ) after every step, or a file's θ
            self.log_theta = nn.Parameter(start.log())
            self.register_buffer("theta", start)
        else:
            self.theta = nn.Parameter(start)

    def trained_theta(self) -> Tensor:
        """θ as the optimizer holds it: a function of log θ, or θ itself."""
        return self.log_theta.exp() if self.cfg.theta_param == "log" else self.theta

    def make_optimizer(self, params: list, lr: float, betas: tuple[float, float],
                       fused: bool | None) -> torch.optim.Optimizer:
        """The method's optimizer, with θ (or log θ) in a group of its own at `theta_lr` times the run's lr."""
        theta = self.log_theta if self.cfg.theta_param == "log" else self.theta
        rest = [p for p in params if p is not theta]
        if len(rest) == len(params):  # θ is not trained
            return super().make_optimizer(params, lr, betas, fused)
        return super().make_optimizer([{"params": rest}, {"params": [theta], "lr": lr * self.cfg.theta_lr}], lr,
                                      betas, fused)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return threshold(self.pre_acts(x), self.theta, self.cfg.m)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        self.check_input(x)
        y = self.check_target(x, target)
        pre, theta = self.pre_acts(x), self.trained_theta()
        z = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        z = z * (z != 0)  # gradient only where a latent fires, as through the packed code of `encode`
        l0, k = _Step.apply(pre, theta, self.cfg.bandwidth).sum(1), self.cfg.k
        penalty = l0.mean() if k is None else (2 / k * (l0 - k).pow(2)).mean()
        return self.dense_output(x, z, y, l0=self.cfg.l0_coef * penalty)  # full-width code, one-matmul decode

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        if self.cfg.theta_param == "log":
            self.theta.copy_(self.log_theta.exp())
        else:
            self.theta.clamp_(min=0.0)

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        log, theta = prefix + "log_theta", prefix + "theta"
        if theta not in state and log in state:  # saved before θ was kept
            state[theta] = state[log].exp()
        if self.cfg.theta_param == "direct":  # a log-θ file read as direct θ: its θ itself
            state.pop(log, None)
        elif log not in state and theta in state:
            state[log] = state[theta].log()
        super()._load_from_state_dict(state, prefix, *args, **kwargs)
