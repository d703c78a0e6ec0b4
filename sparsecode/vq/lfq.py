"""Binary codes: lookup-free quantization (LFQ, sign bits ±1) or Bernoulli bits {0, 1} ("Binary latent
diffusion"), each with a straight-through gradient; m bits give 2^m implicit codes.

`mode="sign"`: q = sign(z) (LFQ); an optional entropy loss (weight `entropy_weight`) lowers each row's
bit entropy and raises the batch's, on the factorised per-bit distribution p = sigmoid(2z) (our reading:
the per-bit form of LFQ's entropy penalty, which the full 2^m-code form equals when bits are independent).
`mode="bernoulli"`: p = sigmoid(z); training samples b ~ Bernoulli(p) from the run's generator and
passes the gradient to p; encode (eval) thresholds p at ½, so codes are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..coder import CoderConfig, register
from ..config import check, non_negative
from .scalar import ScalarQuantizer


@dataclass
class LFQConfig(CoderConfig):
    m: int = 16  # bits
    mode: str = "sign"  # sign (LFQ, ±1) | bernoulli (binary latents, {0, 1})
    entropy_weight: float = 0.0  # LFQ entropy penalty (sign mode)

    def validate(self) -> None:
        super().validate()
        check(self.mode in ("sign", "bernoulli"), f"mode must be 'sign' or 'bernoulli', got {self.mode!r}")
        non_negative(self, "entropy_weight")


def bit_entropy(p: Tensor) -> Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


@register("lfq")
class LFQ(ScalarQuantizer):
    """Sign or Bernoulli bits with a straight-through gradient."""

    config_class = LFQConfig

    def levels(self) -> list[int]:
        return [2] * self.cfg.m

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.mode == "sign":
            hard = torch.where(z > 0, 1.0, -1.0).to(z.dtype)
            q = z + (hard - z).detach()
        else:
            p = torch.sigmoid(z)
            if self.training:
                hard = (self.rand(*p.shape, device=p.device) < p.detach()).to(z.dtype)
            else:
                hard = (p.detach() > 0.5).to(z.dtype)
            q = p + (hard - p).detach()
        return q, self.level_index(q.detach())

    def level_index(self, values: Tensor) -> Tensor:
        return (values > 0).long()

    def extra_losses(self, z: Tensor, q: Tensor, idx: Tensor) -> dict[str, Tensor]:
        if self.cfg.mode != "sign" or not self.cfg.entropy_weight:
            return {}
        p = torch.sigmoid(2 * z)  # P(bit = +1) under a softmax over the two levels ±1
        per_row = bit_entropy(p).sum(1).mean()
        batch = bit_entropy(p.mean(0)).sum()
        return {"entropy": self.cfg.entropy_weight * (per_row - batch) / self.cfg.m}


