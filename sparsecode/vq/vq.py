"""Vector quantization (VQ-VAE) of activations: one code per token, weight 1.

Lookup by L2 or cosine (with `metric="cosine"` rows and codes are compared normalised, while the
codebook keeps the unnormalised cluster means, so x̂ keeps the data's scale). The codebook learns by
EMA (decay, Laplace smoothing) or by the codebook loss; straight-through estimator and commitment loss
for whatever feeds the quantizer. Remedies for collapse: k-means initialisation from the first batches
and restart of codes unused for `restart_after` steps onto badly quantized rows of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, CoderConfig, Output, register
from ..config import check
from ..metrics import fvu
from .kmeans import kmeans
from .search import nearest


@dataclass
class VQConfig(CoderConfig):
    metric: str = "l2"  # l2 | cosine
    ema: bool = True  # EMA codebook updates; False trains the codebook by the codebook loss
    decay: float = 0.99
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    beta: float = 0.25  # commitment weight
    kmeans_init: bool = True
    kmeans_iters: int = 10
    restart_after: int = 50  # steps a code may go unused before it restarts from a batch row; 0 = never
    search_budget: int = 1 << 24  # most elements in one [rows, codes] distance block

    def validate(self) -> None:
        super().validate()
        check(self.metric in ("l2", "cosine"), f"metric must be 'l2' or 'cosine', got {self.metric!r}")
        check(0 < self.decay < 1, f"decay must be in (0, 1), got {self.decay}")
        check(self.eps > 0, f"eps must be positive, got {self.eps}")
        check(self.beta >= 0, f"beta must be non-negative, got {self.beta}")
        check(self.kmeans_iters >= 0, f"kmeans_iters must be non-negative, got {self.kmeans_iters}")
        check(self.restart_after >= 0, f"restart_after must be non-negative, got {self.restart_after}")
        check(self.search_budget >= 1, f"search_budget must be positive, got {self.search_budget}")


@register("vq")
class VQ(Coder):
    """Nearest-code quantizer with EMA updates, k-means init and dead-code restarts."""

    config_class = VQConfig

    def __init__(self, cfg: VQConfig):
        super().__init__(cfg)
        self.codebook = nn.Parameter(torch.randn(cfg.m, cfg.d_in), requires_grad=not cfg.ema)
        self.register_buffer("ema_count", torch.ones(cfg.m))
        self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("idle_steps", torch.zeros(cfg.m, dtype=torch.long))

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        idx = nearest(x.detach(), self.codebook.detach(), self.cfg.metric, self.cfg.search_budget)
        return Code(idx[:, None], torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype), self.cfg.m)

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
                stats["restarts"] = float(self.restart(x.detach(), code.indices[:, 0], err))
        x_hat = x + (q - x).detach()  # straight-through: forward is q, gradient passes to x
        return Output(x_hat, code, losses, stats)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        if not self.cfg.kmeans_init:
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
        self.ema_count.mul_(d).add_(torch.bincount(idx, minlength=self.cfg.m).to(x.dtype), alpha=1 - d)
        self.ema_sum.mul_(d).index_add_(0, idx, x, alpha=1 - d)
        n = self.ema_count.sum()
        size = (self.ema_count + self.cfg.eps) / (n + self.cfg.m * self.cfg.eps) * n
        self.codebook.copy_(self.ema_sum / size[:, None])

    @torch.no_grad()
    def restart(self, x: Tensor, idx: Tensor, err: Tensor) -> int:
        """Move codes idle for `restart_after` steps onto batch rows drawn ∝ their squared error
        (as k-means++ seeds), so they land where the codebook fits worst; returns how many moved."""
        used = torch.bincount(idx, minlength=self.cfg.m) > 0
        self.idle_steps += 1
        self.idle_steps[used] = 0
        dead = (self.idle_steps >= self.cfg.restart_after).nonzero()[:, 0]
        if dead.numel() == 0:
            return 0
        p = err.double().cpu() + 1e-12
        rows = torch.multinomial(p / p.sum(), dead.numel(), replacement=True, generator=self.generator)
        rows = rows.to(x.device)
        self.codebook[dead] = x[rows]
        self.ema_sum[dead] = x[rows]
        self.ema_count[dead] = 1.0
        self.idle_steps[dead] = 0
        return dead.numel()
