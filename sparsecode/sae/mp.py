"""Matching-pursuit SAE (MP-SAE, "From flat to hierarchical"): the encoder is unrolled matching pursuit.

r ← x − b_dec; T times: i = argmax_j ⟨r, d_j⟩, a = ⟨r, d_i⟩, z_i += a, r ← r − a·d_i, over the unit-norm
decoder rows; no encoder matrix. Trained end to end: gradients reach W_dec and b_dec through every step's
coefficient and residual (the argmax choices are not differentiated). Codes are non-negative as in the
paper's formulation; a row stops early (slot −1) once no atom has a positive inner product with r. An
atom chosen twice fills two slots (its weights add up in the decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code
from ..coder import SparseConfig, register
from .base import Dictionary, unit_rows


def matching_pursuit(r: Tensor, atoms: Tensor, steps: int, signed: bool = False,
                     limit: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(indices [B, steps], values [B, steps], final residual) of `steps` rounds of matching pursuit.

    `signed`: pick by |⟨r, d⟩| with signed weights (classic MP); otherwise by ⟨r, d⟩ with weights ≥ 0.
    Differentiable in `r` and `atoms` through the weights; unused slots get index −1 and weight 0.
    `limit` (a device scalar) stops after that many rounds without the host reading it: later rounds run
    but change nothing.
    """
    indices, values = [], []
    for step in range(steps):
        scores = r @ atoms.t()
        key = scores.detach().abs() if signed else scores.detach()
        best = key.argmax(1, keepdim=True)
        a = scores.gather(1, best)
        live = (key.gather(1, best) > 0) if not signed else (a.detach() != 0)
        if limit is not None:
            live = live & (limit > step)
        a = a * live
        r = r - a * atoms[best[:, 0]]
        indices.append(best.masked_fill(~live, -1))
        values.append(a)
    return torch.cat(indices, 1), torch.cat(values, 1), r


@dataclass
class MPConfig(SparseConfig):
    k: int = 32  # T, the pursuit steps (the most active slots per row)


@register("mp")
class MPSAE(Dictionary):
    """Matching pursuit over the decoder's atoms, T = k steps: a decoder, no encoder of its own."""

    config_class = MPConfig

    def __init__(self, cfg: MPConfig):
        super().__init__(cfg)
        self.W_dec = nn.Parameter(unit_rows(cfg.m, cfg.d_in))  # [m, d]: one atom per row
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        indices, values, _ = matching_pursuit(x - self.b_dec, self.W_dec, self.cfg.k)
        return Code(indices, values, self.cfg.m)
