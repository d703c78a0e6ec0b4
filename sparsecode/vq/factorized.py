"""Factorised low-dimensional lookup (ViT-VQGAN's factorized codes): project x to `code_dim` dims,
l2-normalise, pick the nearest of m unit codes there (cosine), project the code back up.

Its own method rather than a `vq` option, because it adds trained projections and a gradient-trained
codebook where `vq` is a plain EMA quantizer. The atoms in input space are the up-projected codes;
losses: FVU of x̂ = up(ẑ) with ẑ passed straight-through to the down-projection, the codebook loss
‖sg(z) − e‖² and β‖z − sg(e)‖² in the low-dimensional space (mean over rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, Output, register
from ..config import check, non_negative
from ..metrics import fvu
from .kmeans import KMeansConfig, kmeans
from .search import nearest


@dataclass
class FactorizedConfig(KMeansConfig):
    code_dim: int = 8  # dims of the lookup space
    beta: float = 0.25
    init: str = "kmeans"  # kmeans (of the projected data) | random: how the codes start
    legacy: ClassVar[dict] = {"kmeans_init": ("init", {True: "kmeans", False: "random"})}

    def validate(self) -> None:
        super().validate()
        check(0 < self.code_dim <= self.d_in, f"code_dim must be in 1..d_in={self.d_in}, got {self.code_dim}")
        non_negative(self, "beta")
        check(self.init in ("kmeans", "random"), f"init must be 'kmeans' or 'random', got {self.init!r}")


@register("vq_factorized")
class FactorizedVQ(Coder):
    """Down-project, normalise, nearest unit code, up-project."""

    config_class = FactorizedConfig

    def __init__(self, cfg: FactorizedConfig):
        super().__init__(cfg)
        self.down = nn.Linear(cfg.d_in, cfg.code_dim)
        self.up = nn.Linear(cfg.code_dim, cfg.d_in)
        self.codebook = nn.Parameter(F.normalize(torch.randn(cfg.m, cfg.code_dim), dim=1))

    def project(self, x: Tensor) -> Tensor:
        return F.normalize(self.down(x), dim=1)

    def unit_codes(self) -> Tensor:
        return F.normalize(self.codebook, dim=1)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        idx = nearest(self.project(x).detach(), self.unit_codes().detach(), "l2", self.cfg.search_budget)
        return Code.ones(idx, self.cfg.m, x.dtype)

    def atoms(self) -> Tensor:
        return self.up(self.unit_codes())  # bias included: each atom is a whole reconstruction

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.atoms())

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        z = self.project(x)
        code = self.encode(x)
        e = self.unit_codes()[code.indices[:, 0]]
        x_hat = self.up(z + (e - z).detach())
        losses = {"fvu": fvu(x, x_hat), "codebook": (z.detach() - e).pow(2).sum(1).mean(),
                  "commit": self.cfg.beta * (z - e.detach()).pow(2).sum(1).mean()}
        if self.training:
            self.track(code)
        return Output(x_hat, code, losses)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        self.up.bias.copy_(x.mean(0))
        if self.cfg.init == "kmeans":
            z = self.project(x)
            self.codebook.copy_(kmeans(z, self.cfg.m, self.cfg.kmeans_iters, "cosine", self.generator,
                                             self.cfg.search_budget))
