"""Finite scalar quantization (FSQ, Mentzer et al.): project to len(levels) dimensions, bound dimension
j to L_j levels, round with a straight-through gradient; the implicit codebook has ∏ L_j codes, all
reachable by construction.

Bound (the paper's): h = ⌊L/2⌋-style half-width (L−1)/2 times tanh(z), shifted by ½ for even L so that
rounding gives exactly L levels; the values are scaled to [−1, 1]. m is set by `levels` (one atom,
a row of the output projection, per dimension).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..coder import CoderConfig, register
from ..config import check
from .scalar import ScalarQuantizer


@dataclass
class FSQConfig(CoderConfig):
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # 1000 implicit codes
    m: int = field(init=False)  # one atom per dimension: len(levels), not an option of its own

    def __post_init__(self) -> None:
        self.m = len(self.levels)

    def validate(self) -> None:
        check(len(self.levels) > 0 and all(int(n) >= 2 for n in self.levels),
              f"levels must be a non-empty list of integers ≥ 2, got {self.levels}")
        super().validate()


@register("fsq")
class FSQ(ScalarQuantizer):
    """Bounded, rounded scalar per dimension; ∏ levels implicit codes."""

    config_class = FSQConfig

    def __init__(self, cfg: FSQConfig):
        super().__init__(cfg)
        n = torch.tensor(cfg.levels, dtype=torch.float32)
        self.register_buffer("half_width", (n - 1) / 2, persistent=False)
        self.register_buffer("shift", (1 - n % 2) / 2, persistent=False)  # ½ for even L, 0 for odd

    def levels(self) -> list[int]:
        return list(self.cfg.levels)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h = self.half_width * torch.tanh(z) + self.shift
        r = h + (torch.round(h) - h).detach()  # straight-through rounding
        q = (r - self.shift) / self.half_width  # in [−1, 1]
        return q, self.level_index(q.detach())

    def level_index(self, values: Tensor) -> Tensor:
        return torch.round(values * self.half_width + self.half_width).long()
