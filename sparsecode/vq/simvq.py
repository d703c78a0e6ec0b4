"""SimVQ ("Addressing representation collapse in VQ models with one linear layer"): C = E·Wᵀ + b.

E is a frozen random K×d basis (standard normal / √d, drawn at construction), W one learnable d×d
linear layer; the codebook loss moves W, hence the whole codebook at once, so codes the data never picks
still move with the rest. Reading chosen: the layer is a plain `nn.Linear` (with bias, PyTorch's
default); `init_from_data` (our addition; `init=random` is the paper's) sets b to the data mean and W to
`init_scale` times a square root of the data's covariance: a Gaussian cloud of the data's shape.
`init_scale` < 1 tightens the cloud for wide real activations, where codes at the data's full spread are
all farther from a row than the mean is (BENCHMARKS.md, "Notes moved from the code").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..coder import register
from ..config import check, positive
from .base import Quantizer, QuantizerConfig, covariance_root, identity_linear


@dataclass
class SimVQConfig(QuantizerConfig):
    init: str = "data"  # data (W, b at the data's mean and a fraction of its covariance) | random (the paper's)
    legacy: ClassVar[dict] = {"data_init": ("init", {True: "data", False: "random"})}
    init_scale: float = 1.0  # the starting cloud's spread, as a fraction of the data's (0.3 for wide real data)

    def validate(self) -> None:
        super().validate()
        positive(self, "init_scale")
        check(self.init in ("data", "random"), f"init must be 'data' or 'random', got {self.init!r}")


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
        if self.cfg.init == "random":
            return
        mean = x.mean(0)
        root = covariance_root(x - mean) * self.cfg.d_in**0.5  # the basis has covariance I/d
        self.proj.weight.copy_(root * self.cfg.init_scale)
        self.proj.bias.copy_(mean)
        self.clear_cache()
