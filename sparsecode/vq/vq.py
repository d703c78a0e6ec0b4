"""Vector quantization (VQ-VAE) of activations: one code per token, weight 1.

Lookup by L2 or cosine (with `metric="cosine"` rows and codes are compared normalised, while the
codebook keeps the unnormalised cluster means, so x̂ keeps the data's scale). The codebook learns by
EMA (decay, Laplace smoothing) or by the codebook loss; straight-through estimator and commitment loss
for whatever feeds the quantizer. Remedies for collapse: k-means initialisation from the first batches
and restart of long-unused codes. "Long" is measured in expected hits: a code restarts once it has gone unused
for `restart_after`·m rows, as long as a code of uniform usage takes to be hit `restart_after` times, so a
healthy codebook of any size sees about B·e^(−restart_after) restarts per step rather than churn that grows
with m; but at most a quarter of the run (`dead_tokens`), so the first restarts come in the run's first half
however large m is (`base.restart_age`). Where a dead code goes (`restart_to`): `split` (default) halves a
busy code, the code of a uniformly drawn batch row, by placing the dead one a step `split_step` from it toward
that row, with half its EMA mass; `error` puts it on a row drawn ∝ its squared error (as k-means++ seeds).
On real activations `error` lands codes on outlier rows that only they use, so they die again and restarts
never settle; a split code takes about half of a cell the data fills, and stays in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .. import distributed
from ..code import Code, decode
from ..coder import Coder, Output, register
from ..config import check, positive
from ..metrics import fvu
from .base import (
    KMEANS_ROWS_PER_CODE,
    RESTART_WINDOW_PARTS,
    QuantizerConfig,
    draw_rows,
    due_codes,
    restart_age,
    split_targets,
)
from .kmeans import KMeansConfig, kmeans
from .search import nearest


@dataclass
class VQConfig(QuantizerConfig, KMeansConfig):
    ema: bool = True  # EMA codebook updates; False trains the codebook by the codebook loss
    decay: float = 0.99
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    init: str = "kmeans"  # kmeans | random: how the codebook starts
    restart_to: str = "split"  # split (halve a busy code) | error (a row drawn ∝ its squared error)
    legacy: ClassVar[dict] = {"kmeans_init": ("init", {True: "kmeans", False: "random"})}

    def validate(self) -> None:
        super().validate()
        check(0 < self.decay < 1, f"decay must be in (0, 1), got {self.decay}")
        positive(self, "eps")
        check(self.init in ("kmeans", "random"), f"init must be 'kmeans' or 'random', got {self.init!r}")
        check(self.restart_to in ("split", "error"), f"restart_to must be 'split' or 'error', got {self.restart_to!r}")


@register("vq")
class VQ(Coder):
    """Nearest-code quantizer with EMA updates, k-means init and dead-code restarts."""

    config_class = VQConfig
    data_parallel = True
    dead_window_parts = RESTART_WINDOW_PARTS
    init_rows_per_atom = KMEANS_ROWS_PER_CODE

    def __init__(self, cfg: VQConfig):
        super().__init__(cfg)
        self.codebook = nn.Parameter(torch.randn(cfg.m, cfg.d_in), requires_grad=not cfg.ema)
        self.register_buffer("ema_count", torch.ones(cfg.m))
        self.register_buffer("ema_sum", self.codebook.detach().clone())

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        idx = nearest(x.detach(), self.codebook.detach(), self.cfg.metric, self.cfg.search_budget)
        return Code.ones(idx, self.cfg.m, x.dtype)

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.codebook)

    def atoms(self) -> Tensor:
        return self.codebook

    def forward(self, x: Tensor) -> Output:
        code = self.encode(x)
        q = self.decode(code)
        losses = {"commit": self.cfg.beta * fvu(x, q.detach())}
        if not self.cfg.ema:
            losses["codebook"] = fvu(x.detach(), q)
        stats = {}
        if self.training:
            self.track(code)
            if self.cfg.ema:
                self.ema_update(x.detach(), code.indices[:, 0])
            if self.cfg.restart_after:
                stats["restarts"] = self.restart(x.detach(), code.indices[:, 0], q.detach()).float()  # read when logged
        x_hat = x + (q - x).detach()  # straight-through: forward is q, gradient passes to x
        return Output(x_hat, code, losses, stats)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        if self.cfg.init == "random":
            return
        c = kmeans(x, self.cfg.m, self.cfg.kmeans_iters, self.cfg.metric, self.generator, self.cfg.search_budget)
        if self.cfg.metric == "cosine":  # keep the data's scale: codes are means, lookup is normalised
            c = c * x.norm(dim=1).mean()
        self.codebook.copy_(c)
        self.ema_sum.copy_(c)
        self.ema_count.fill_(1.0)

    @torch.no_grad()
    def ema_update(self, x: Tensor, idx: Tensor) -> None:
        d = self.cfg.decay
        hits = torch.zeros(self.cfg.m, dtype=x.dtype, device=x.device).index_add_(
            0, idx, torch.ones(idx.shape, dtype=x.dtype, device=x.device))  # bincount, at a fixed size
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, x.to(self.ema_sum.dtype))
        self.ema_count.mul_(d).add_(distributed.total(hits), alpha=1 - d)  # a split batch: every rank's rows
        self.ema_sum.mul_(d).add_(distributed.total(sums), alpha=1 - d)
        n = self.ema_count.sum()
        size = (self.ema_count + self.cfg.eps) / (n + self.cfg.m * self.cfg.eps) * n
        self.codebook.copy_(self.ema_sum / size[:, None])

    def idle_watch(self) -> float:
        return restart_age(self.cfg)  # the host follows how many codes are due a restart

    @torch.no_grad()
    def restart(self, x: Tensor, idx: Tensor, q: Tensor) -> Tensor:
        """Move the longest-unused dead codes (at most one per batch row; `due_codes`) to distinct rows' places
        (`restart_to`; `idx` and `q` are the rows' codes and quantized values); how many moved (a device scalar)."""
        picked = due_codes(self, distributed.rows(x.shape[0]))
        if picked is None:
            return torch.zeros((), dtype=torch.long, device=x.device)
        cand, dead = picked
        x, idx, q = distributed.everyone(x, idx, q)  # a split batch: every rank restarts alike from all rows
        n = cand.shape[0]
        if self.cfg.restart_to == "split":  # the busy code keeps half its EMA mass, the new one gets the rest
            rows, new = split_targets(self, x, q, n)
            busy = idx[rows]
            half = torch.where(dead, 0.5, 1.0).to(x.dtype)
            mass = self.ema_count[busy] * half
            self.ema_count[busy] = mass
            self.ema_sum[busy] = self.ema_sum[busy] * half[:, None]
        else:
            new = x[draw_rows(self, (x - q).pow(2).sum(1), n)]
            mass = torch.ones(n, dtype=x.dtype, device=x.device)
        keep = ~dead[:, None]
        self.codebook[cand] = torch.where(keep, self.codebook[cand], new)
        self.ema_sum[cand] = torch.where(keep, self.ema_sum[cand], new * mass[:, None])
        self.ema_count[cand] = torch.where(dead, mass, self.ema_count[cand])
        self.since_fired[cand] = torch.where(dead, 0, self.since_fired[cand])
        self.idle_lowered()
        return dead.sum()
