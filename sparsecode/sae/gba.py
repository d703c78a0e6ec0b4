"""Group Bias Adaptation (Chen et al. 2025, "Taming polysemanticity: provable feature recovery via SAEs").

A ReLU SAE trained on FVU alone, no L1: sparsity comes from the encoder biases, which are not trained by
gradient but adapted so that each latent fires at its group's target activation frequency (TAF). The
latents are split into `groups` equal groups with TAFs spaced geometrically from `freq_max` down to
`freq_min`. Reading of the update rule (the authors' code could not be reached here; this follows the
paper's description of bias adaptation): every `adapt_every` steps, for each latent m with firing
frequency p_m over that window and r_m the largest pre-activation W_enc,m·(x − b_dec) it saw there,
  b_m ← b_m − γ·r_m if p_m > TAF,   b_m ← b_m + γ·r_m if p_m < TAF,   then b_m ← min(b_m, 0).
The paper raises the bias only of latents that (almost) never fire; raising it whenever p_m < TAF makes
the rule two-sided, so each frequency settles at its target (the behaviour the tests assert).
A mean L0 is the sum of the latents' firing frequencies, so `k` (active latents per token, as elsewhere)
scales every TAF by one factor, keeping the groups' geometric spread freq_max/freq_min, until they sum to k;
the same adaptation then aims at L0 = k. Without `k` the TAFs are freq_max..freq_min as given.
Two constraints of ours keep the thresholds meaningful: b_dec stays at the data mean (set from the first
rows, not trained: `train_b_dec`), and encoder rows stay unit-norm (`unit_encoder`); without them the
thresholds run away (BENCHMARKS.md, "Notes moved from the code").
The encoder is dense: a training step keeps the [B, m] activations (full-width code, one-matmul decode) and
adapts the biases on the device, so it never waits for it; `encode` packs the non-zeros (a host read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..code import Code
from ..coder import CoderConfig, Output, register
from ..config import check, positive
from .base import SAE, dense_to_code


@dataclass
class GBAConfig(CoderConfig):
    groups: int = 10
    freq_max: float = 0.1  # TAF of the first group
    freq_min: float = 0.001  # TAF of the last group
    gamma: float = 0.01  # bias step, as a share of r_m
    adapt_every: int = 1  # steps per adaptation window
    unit_encoder: bool = True  # keep encoder rows unit-norm, so the biases alone set the thresholds
    train_b_dec: bool = False  # b_dec stays at the data mean; training it let the thresholds run away
    k: int | None = None  # target mean L0: TAFs scaled (spread kept) to sum to k; None: freq_max..freq_min

    def validate(self) -> None:
        super().validate()
        check(0 < self.groups <= self.m, f"groups must be in 1..m={self.m}, got {self.groups}")
        check(0 < self.freq_min <= self.freq_max <= 1,
              f"need 0 < freq_min <= freq_max <= 1, got {self.freq_min} and {self.freq_max}")
        check(0 < self.gamma < 1, f"gamma must be in (0, 1), got {self.gamma}")
        positive(self, "adapt_every")
        check(self.k is None or 0 < self.k <= self.m, f"k must be in 1..m={self.m}, got k={self.k}")
        top = float(group_targets(self)[0])
        check(top <= 1, f"k={self.k} needs the first group to fire at {top:.3g} > 1 per token: lower k, or "
                        f"narrow freq_max/freq_min (now {self.freq_max / self.freq_min:.3g}×)")


def group_targets(cfg: GBAConfig) -> Tensor:
    """[m] target activation frequency of each latent: geometric over the groups, scaled to sum to k if set."""
    group = torch.arange(cfg.m) * cfg.groups // cfg.m
    ratio = torch.tensor(cfg.freq_min / cfg.freq_max)
    target = cfg.freq_max * ratio.pow(group / max(cfg.groups - 1, 1))
    return target * (cfg.k / target.sum()) if cfg.k is not None else target


@register("gba")
class GBASAE(SAE):
    """ReLU SAE whose biases track per-group firing-frequency targets."""

    config_class = GBAConfig

    def __init__(self, cfg: GBAConfig):
        super().__init__(cfg)
        self.b_enc.requires_grad_(False)
        self.b_dec.requires_grad_(cfg.train_b_dec)
        self.register_buffer("target", group_targets(cfg))
        self.register_buffer("fires", torch.zeros(cfg.m))
        self.register_buffer("peak", torch.zeros(cfg.m))
        self.register_buffer("window_rows", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_steps", torch.zeros((), dtype=torch.long))

    def group_of(self) -> Tensor:
        """[m] group number of each latent."""
        return torch.arange(self.cfg.m, device=self.target.device) * self.cfg.groups // self.cfg.m

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return dense_to_code(self.pre_acts(x).relu(), self.cfg.m)

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        pre = self.pre_acts(x)
        out = self.dense_output(x, pre.relu())  # full-width code, one-matmul decode: no host sync
        if self.training:
            with torch.no_grad():
                self.fires += (pre > 0).sum(0)
                self.peak.copy_(torch.maximum(self.peak, (pre - self.b_enc).max(0).values))
                self.window_rows += x.shape[0]
        return out

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        if self.cfg.unit_encoder:
            self.W_enc /= self.W_enc.norm(dim=1, keepdim=True).clamp_min(1e-8)
        # on the device: whether this step closes a window is a tensor, never read by the host
        seen = self.window_rows > 0  # a forward since the last adaptation
        self.window_steps += seen
        adapt = seen & (self.window_steps >= self.cfg.adapt_every)
        p = self.fires / self.window_rows.clamp_min(1)
        step = self.cfg.gamma * self.peak.clamp_min(1e-6)
        b = self.b_enc - step * (p > self.target)
        b = (b + step * (p < self.target)).clamp(max=0.0)
        self.b_enc.copy_(torch.where(adapt, b, self.b_enc))
        for buf in (self.fires, self.peak, self.window_rows, self.window_steps):
            buf.masked_fill_(adapt, 0)
