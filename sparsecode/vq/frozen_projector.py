"""Large frozen codebook + trained projector (VQGAN-LC): codes are the data's own k-means centres or
samples, frozen; only a linear projector P (d×d with bias, identity at the start) that maps the codebook
into the latent space is trained, by the codebook loss: C = P(C₀).

The codebook is drawn from the rows handed to `init_from_data` (the run's `init_rows`, 8 per code unless set;
with fewer rows than codes, rows repeat and the copies start unused). Restarts (our addition, base.py) move
a long-unused code to split a busy one, and `refine` moves each used code's offset toward its rows' mean;
`restart_after=0 refine=0` is the paper's method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..coder import register
from ..config import check
from .base import OffsetConfig, Quantizer, identity_linear
from .kmeans import KMeansConfig, kmeans, sample_rows


@dataclass
class FrozenProjectorConfig(OffsetConfig, KMeansConfig):
    init: str = "kmeans"  # kmeans | samples: how the frozen codebook is drawn from the data
    kmeans_iters: int = 5  # fewer Lloyd rounds than vq's: the projector corrects the rest

    def validate(self) -> None:
        super().validate()
        check(self.init in ("kmeans", "samples"), f"init must be 'kmeans' or 'samples', got {self.init!r}")


@register("frozen_projector")
class FrozenProjector(Quantizer):
    """Frozen data-drawn codebook C₀; the codebook in use is P(C₀) with a trained linear P."""

    config_class = FrozenProjectorConfig

    def __init__(self, cfg: FrozenProjectorConfig):
        super().__init__(cfg)
        self.register_buffer("frozen", torch.randn(cfg.m, cfg.d_in) / cfg.d_in**0.5)
        self.proj = identity_linear(cfg.d_in)

    def computed(self) -> Tensor:
        return self.proj(self.frozen)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        cfg = self.cfg
        if cfg.init == "kmeans":
            c = kmeans(x, cfg.m, cfg.kmeans_iters, "l2", self.generator, cfg.search_budget)
        else:
            c = x[sample_rows(x.shape[0], cfg.m, self.generator).to(x.device)]
        self.frozen.copy_(c)
        self.clear_cache()
