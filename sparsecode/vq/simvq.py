"""SimVQ ("Addressing representation collapse in VQ models with one linear layer"): C = E·Wᵀ + b.

E is a frozen random K×d basis (standard normal / √d, drawn at construction), W one learnable d×d
linear layer; the codebook loss moves W, hence the whole codebook at once, so codes the data never picks
still move with the rest. Reading chosen: the layer is a plain `nn.Linear` (with bias, PyTorch's default).
How the codebook starts (`init`): `kmeans` (default, our addition) adds to each code a frozen offset that
puts the codebook on k-means centres of the data, W = I: in 384-d activations a random cloud, even one of the
data's own covariance (`data`), is farther from every row than the few codes of smallest spread, which take
all rows; `random` is the paper's. Restarts split busy codes and `refine` moves each used code's offset
toward its rows' mean (base.py; `restart_after=0`, `refine=0`: the paper's, where codes move only with W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..coder import register
from ..config import check, positive
from .base import OffsetConfig, Quantizer, covariance_root, identity_linear
from .kmeans import KMeansConfig


@dataclass
class SimVQConfig(OffsetConfig, KMeansConfig):
    init: str = "kmeans"  # kmeans (codes start on k-means centres) | data (W, b: a cloud of the data's covariance,
    #                       scaled by init_scale) | random (the paper's)
    legacy: ClassVar[dict] = {"data_init": ("init", {True: "data", False: "random"})}
    init_scale: float = 1.0  # init=data: the starting cloud's spread, as a fraction of the data's

    def validate(self) -> None:
        super().validate()
        positive(self, "init_scale")
        check(self.init in ("kmeans", "data", "random"),
              f"init must be 'kmeans', 'data' or 'random', got {self.init!r}")


@register("simvq")
class SimVQ(Quantizer):
    """Frozen random basis times one learnable linear layer."""

    config_class = SimVQConfig

    def __init__(self, cfg: SimVQConfig):
        super().__init__(cfg)
        self.register_buffer("basis", torch.randn(cfg.m, cfg.d_in) / cfg.d_in**0.5)
        self.proj = identity_linear(cfg.d_in)

    def computed(self) -> Tensor:
        return self.proj(self.basis)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        if self.cfg.init == "random":
            return
        if self.cfg.init == "kmeans":
            return self.start_at_kmeans(x, self.cfg.kmeans_iters)
        mean = x.mean(0)
        root = covariance_root(x - mean) * self.cfg.d_in**0.5  # the basis has covariance I/d
        self.proj.weight.copy_(root * self.cfg.init_scale)
        self.proj.bias.copy_(mean)
        self.clear_cache()
