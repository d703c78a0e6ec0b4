"""Matching-pursuit SAE (MP-SAE, "From flat to hierarchical"): the encoder is unrolled matching pursuit.

r ← x − b_dec; T times: i = argmax_j ⟨r, d_j⟩, a = ⟨r, d_i⟩, z_i += a, r ← r − a·d_i, over the unit-norm
decoder rows; no encoder matrix. Trained end to end: gradients reach W_dec and b_dec through every step's
coefficient and residual (the argmax choices are not differentiated). Codes are non-negative as in the
paper's formulation; a row stops early (slot −1) once no atom has a positive inner product with r. An
atom chosen twice fills two slots (its weights add up in the decoder). Speed: the [B, m] scores only pick
(no autograd; each weight is recomputed from the picked row), and where it costs less than a [B, m] × [m, d]
product a round, they are updated through the Gram matrix instead (MP's classic fast form, `gram=True`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code
from ..coder import SparseConfig, register
from ..config import non_negative
from .base import Dictionary, unit_rows


def matching_pursuit(r: Tensor, atoms: Tensor, steps: int, signed: bool = False,
                     limit: Tensor | None = None, gram: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(indices [B, steps], values [B, steps], final residual) of `steps` rounds of matching pursuit.

    `signed`: pick by |⟨r, d⟩| with signed weights (classic MP); otherwise by ⟨r, d⟩ with weights ≥ 0.
    Differentiable in `r` and `atoms` through the weights ⟨r, d_i⟩ (O(B·d) a round backward); unused slots
    get index −1 and weight 0. `limit` (a device scalar) stops after that many rounds without the host
    reading it: later rounds run but change nothing. `gram`: compute the fp32 scores once and then update
    them by −a·⟨d_i, d_j⟩ from the [m, m] Gram matrix (picks agree with the reference up to fp32 rounding).
    """
    indices, values = [], []
    if gram:
        with torch.no_grad(), torch.autocast(r.device.type, enabled=False):
            w = atoms.detach().float()
            scores, g = r.detach().float() @ w.t(), w @ w.t()
    for step in range(steps):
        with torch.no_grad():
            if not gram:
                scores = r @ atoms.t()
            best = (scores.abs() if signed else scores).argmax(1, keepdim=True)
            top = scores.gather(1, best)
            live = (top != 0) if signed else (top > 0)
            if limit is not None:
                live = live & (limit > step)
        atom = atoms[best[:, 0]]
        a = (r * atom).sum(1, keepdim=True) * live
        r = r - a * atom
        if gram and step + 1 < steps:
            with torch.no_grad():
                scores.addcmul_(g.index_select(0, best[:, 0]), a.detach().float(), value=-1)
        indices.append(best.masked_fill(~live, -1))
        values.append(a)
    return torch.cat(indices, 1), torch.cat(values, 1), r


def use_gram(m: int, rows: int, steps: int, budget: int) -> bool:
    """Whether the Gram update is cheaper: m²·d for G against (steps − 1)·rows·m·d, and G fits `budget`."""
    return m * m <= budget and m < (steps - 1) * rows


@dataclass
class MPConfig(SparseConfig):
    k: int = 32  # T, the pursuit steps (the most active slots per row)
    gram_budget: int = 1 << 28  # most elements of the [m, m] Gram matrix of the fast path (0: never use it)

    def validate(self) -> None:
        super().validate()
        non_negative(self, "gram_budget")


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
        gram = use_gram(self.cfg.m, x.shape[0], self.cfg.k, self.cfg.gram_budget)
        indices, values, _ = matching_pursuit(x - self.b_dec, self.W_dec, self.cfg.k, gram=gram)
        return Code(indices, values, self.cfg.m)
