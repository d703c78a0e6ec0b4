"""The classic ReLU SAE: z = ReLU(W_enc (x − b_dec) + b_enc), loss FVU + λ Σ_i |z_i| · ‖W_dec,i‖.

The decoder rows are free (not renormalised) and start at norm `init_norm` (0.1, as SAELens and Anthropic's
April 2024 update do; 1 was the original reading): the L1 term weights each latent by its atom's norm, so
shrinking z while growing the atom gains nothing. The L1 sum is divided by the batch's rms distance to
its mean (`per_row_scale`), which makes λ independent of the data's scale, like FVU. A crosscoder (sites > 1)
weights each latent by the sum of its per-site decoder norms instead (Anthropic's crosscoders, 2024): an L1 over
sites, so a latent pays for every site it writes and one that belongs to one site is pushed to zero elsewhere.

It trains with SAELens's schedule for its standard SAE (`train_defaults`): a constant lr, no warm-up, and every
step's gradient scaled to norm 1 (what SAELens's clip at 1.0 on a summed MSE amounts to): with the cosine decay
and Adam's raw gradient, whose second moment remembers the large early steps, it trained worse (BENCHMARKS.md).

The encoder is dense: gradients reach every latent with a positive pre-activation. A training step keeps
z as [B, m] (its code has all m slots, x̂ is one matmul), so it never reads a width back from the device;
`encode` packs the non-zeros into a narrower code, which reads the busiest row's count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..code import Code
from ..coder import CoderConfig, Output, register
from ..config import non_negative, positive
from .base import SAE, dense_to_code, per_row_scale


@dataclass
class ReLUConfig(CoderConfig):
    l1_coef: float = 0.05  # λ, on the unitless scale above
    init_norm: float = 0.1  # atoms (and the encoder, their transpose) start at this norm; 1 = unit atoms
    center_input: bool = True  # the encoder reads x − b_dec (False: x itself, as some imported SAEs do)

    def validate(self) -> None:
        super().validate()
        non_negative(self, "l1_coef")
        positive(self, "init_norm")


@register("relu")
class ReLUSAE(SAE):
    """Every latent with a positive pre-activation is active; sparsity comes from the L1 penalty."""

    config_class = ReLUConfig
    unit_atoms = False
    transcodes = True  # d_out > 0: a (skip) transcoder; the L1 scale is the target's
    crosscodes = True  # sites > 1: each latent's L1 weight is the sum of its per-site decoder norms
    data_parallel = True  # its L1 scale is the whole batch's (per_row_scale), its counters reduced in track
    train_defaults = {"decay": "constant", "warmup_steps": 0, "grad_norm": "unit"}

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        with torch.no_grad():  # small atoms at the start keep latents alive under L1 (Anthropic, April 2024)
            self.W_dec.mul_(cfg.init_norm)
            self.W_enc.mul_(cfg.init_norm)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return dense_to_code(self.pre_acts(x).relu(), self.cfg.m)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        self.check_input(x)
        y = self.check_target(x, target)
        z = self.pre_acts(x).relu()
        l1 = (z * self.site_norms().sum(1)).sum(1).mean() / per_row_scale(y)
        return self.dense_output(x, z, y, l1=self.cfg.l1_coef * l1)  # full-width code, one-matmul decode
