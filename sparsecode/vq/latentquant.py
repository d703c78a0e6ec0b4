"""Latent quantization (QLAE, "Disentanglement via latent quantization"): each of the m latent
dimensions has its own learnable scalar codebook of `values` entries (initialised evenly in [−½, ½]);
each dimension is rounded to its nearest entry with a straight-through gradient.

Losses (the authors' defaults): quantization 0.01·‖sg(z) − ẑ‖², commitment 0.01·‖z − sg(ẑ)‖² (means
over rows and dims) and the "high weight decay" as the authors' loss term `weight_decay` (0.1) times the
mean squared weight of the encoder and decoder (weights and biases; the scalar codebooks are not decayed)
— a loss term because the trainer's Adam has no weight decay. The decoder here is linear (the seam).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..coder import CoderConfig, register
from ..config import check
from .scalar import ScalarQuantizer


@dataclass
class LatentQuantConfig(CoderConfig):
    m: int = 10  # latent dimensions (the authors use twice the number of factors)
    values: int = 10  # scalar codebook entries per dimension
    quantization: float = 0.01
    commitment: float = 0.01
    weight_decay: float = 0.1

    def validate(self) -> None:
        super().validate()
        check(self.values >= 2, f"values must be at least 2, got {self.values}")
        for name in ("quantization", "commitment", "weight_decay"):
            check(getattr(self, name) >= 0, f"{name} must be non-negative, got {getattr(self, name)}")


@register("latentquant")
class LatentQuant(ScalarQuantizer):
    """A learnable scalar codebook per latent dimension, nearest entry, straight-through."""

    config_class = LatentQuantConfig

    def __init__(self, cfg: LatentQuantConfig):
        super().__init__(cfg)
        self.codebooks = nn.Parameter(torch.linspace(-0.5, 0.5, cfg.values).repeat(cfg.m, 1))  # [m, values]

    def levels(self) -> list[int]:
        return [self.cfg.values] * self.cfg.m

    def level_index(self, values: Tensor) -> Tensor:
        return (values.detach()[:, :, None] - self.codebooks.detach()[None]).abs().argmin(2)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        idx = self.level_index(z)
        return z + (self.entries(idx) - z).detach(), idx

    def entries(self, idx: Tensor) -> Tensor:
        """[B, m] the codebook entries at level indices idx, differentiable in the codebooks."""
        return self.codebooks.gather(1, idx.t()).t()

    def extra_losses(self, z: Tensor, q: Tensor, idx: Tensor) -> dict[str, Tensor]:
        z_hat, cfg = self.entries(idx), self.cfg
        weights = [self.W_in, self.b_in, self.W_out, self.b_out]
        mean_sq = sum(w.pow(2).sum() for w in weights) / sum(w.numel() for w in weights)
        return {"quantization": cfg.quantization * (z.detach() - z_hat).pow(2).mean(),
                "commitment": cfg.commitment * (z - z_hat.detach()).pow(2).mean(),
                "weight_decay": cfg.weight_decay * mean_sq}
