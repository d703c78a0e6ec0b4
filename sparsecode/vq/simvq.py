"""SimVQ ("Addressing representation collapse in VQ models with one linear layer"): C = E·Wᵀ + b.

E is a frozen random K×d basis (standard normal / √d, drawn at construction), W one learnable d×d
linear layer; the codebook loss moves W, hence the whole codebook at once, so codes the data never picks
still move with the rest. Reading chosen: the layer is a plain `nn.Linear` (with bias, PyTorch's
default); `init_from_data` (our addition, off with `data_init=False`) sets b to the data mean and W to
the data's scale times the identity, so the codebook starts as a Gaussian cloud at the data's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..coder import register
from .base import Quantizer, QuantizerConfig, identity_linear


@dataclass
class SimVQConfig(QuantizerConfig):
    data_init: bool = True  # start W, b at the data's scale and mean


@register("simvq")
class SimVQ(Quantizer):
    """Frozen random basis times one learnable linear layer."""

    config_class = SimVQConfig

    def __init__(self, cfg: SimVQConfig):
        super().__init__(cfg)
        self.register_buffer("basis", torch.randn(cfg.m, cfg.d_in) / cfg.d_in**0.5)
        self.proj = identity_linear(cfg.d_in)

    def codes(self) -> Tensor:
        return self.proj(self.basis)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        if not self.cfg.data_init:
            return
        mean = x.mean(0)
        scale = (x - mean).pow(2).sum(1).mean().sqrt()  # rms distance to the mean; the basis rows have norm ≈ 1
        self.proj.weight.copy_(torch.eye(self.cfg.d_in, device=x.device) * scale)
        self.proj.bias.copy_(mean)
        self.clear_cache()
