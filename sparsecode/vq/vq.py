"""Vector quantization (VQ-VAE) of activations: one code per token, weight 1.

Lookup by L2 or cosine (with `metric="cosine"` rows and codes are compared normalised, while the
codebook keeps the unnormalised cluster means, so x̂ keeps the data's scale). The codebook learns by
EMA (decay, Laplace smoothing) or by the codebook loss; straight-through estimator and commitment loss
for whatever feeds the quantizer. Remedies for collapse: k-means initialisation from the first batches
and restart of long-unused codes onto badly quantized rows of the batch. "Long" is measured in expected hits:
a code restarts once it has gone unused for `restart_after`·m rows, as long as a code of uniform usage takes to
be hit `restart_after` times, so a healthy codebook of any size sees about B·e^(−restart_after) restarts per
step (0.3 at B=1024 for the default 8) rather than churn that grows with m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, Output, register
from ..config import check, non_negative, positive
from ..metrics import fvu
from .base import QuantizerConfig
from .kmeans import KMeansConfig, kmeans
from .search import nearest


@dataclass
class VQConfig(QuantizerConfig, KMeansConfig):
    ema: bool = True  # EMA codebook updates; False trains the codebook by the codebook loss
    decay: float = 0.99
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    init: str = "kmeans"  # kmeans | random: how the codebook starts
    restart_after: float = 8.0  # restart a code unused for restart_after·m rows (expected hits); 0 = never
    legacy: ClassVar[dict] = {"kmeans_init": ("init", {True: "kmeans", False: "random"})}

    def validate(self) -> None:
        super().validate()
        check(0 < self.decay < 1, f"decay must be in (0, 1), got {self.decay}")
        positive(self, "eps")
        check(self.init in ("kmeans", "random"), f"init must be 'kmeans' or 'random', got {self.init!r}")
        non_negative(self, "restart_after")


@register("vq")
class VQ(Coder):
    """Nearest-code quantizer with EMA updates, k-means init and dead-code restarts."""

    config_class = VQConfig

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
                err = (x.detach() - q.detach()).pow(2).sum(1)
                stats["restarts"] = self.restart(x.detach(), err).float()  # read when logged
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
        self.ema_count.mul_(d).add_(hits, alpha=1 - d)
        self.ema_sum.mul_(d).index_add_(0, idx, x, alpha=1 - d)
        n = self.ema_count.sum()
        size = (self.ema_count + self.cfg.eps) / (n + self.cfg.m * self.cfg.eps) * n
        self.codebook.copy_(self.ema_sum / size[:, None])

    def idle_watch(self) -> float:
        return self.cfg.restart_after * self.cfg.m  # the host follows how many codes are due a restart

    @torch.no_grad()
    def restart(self, x: Tensor, err: Tensor) -> Tensor:
        """Move the longest-unused dead codes (at most one per batch row) onto distinct batch rows drawn ∝
        their squared error (as k-means++ seeds), so they land where the codebook fits worst; returns how many
        (a device scalar).

        Nothing waits for the device. On the CPU, how many codes are due is read (`idle_count`): none, nothing
        is drawn; else the n due (at most B) move. On a GPU the count stays there, and every step runs at a
        fixed size: the min(m, B) longest idle codes are candidates and those due (a prefix of them) move.
        Rows are drawn as torch.multinomial draws them without replacement (the top keys p / Exp(1): the same
        numbers from the same generator), from the run's generator on x's device.
        """
        _, due = self.idle_count()
        if due == 0:
            return torch.zeros((), dtype=torch.long, device=x.device)
        n = min(self.cfg.m if due is None else due, x.shape[0])
        idle, cand = self.since_fired.float().topk(n)  # longest idle first
        dead = idle >= self.idle_watch()
        p = err.double() + 1e-12
        p = p / p.sum()
        rows = (p / torch.empty_like(p).exponential_(generator=self.generator_for(p.device))).topk(n).indices
        new = x[rows]
        self.codebook[cand] = torch.where(dead[:, None], new, self.codebook[cand])
        self.ema_sum[cand] = torch.where(dead[:, None], new, self.ema_sum[cand])
        self.ema_count[cand] = torch.where(dead, 1.0, self.ema_count[cand])
        self.since_fired[cand] = torch.where(dead, 0, self.since_fired[cand])
        self.idle_lowered()
        return dead.sum()
