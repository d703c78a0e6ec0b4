"""Discrete key–value bottleneck (Träuble et al.): the (frozen) encoder's output is cut into `heads`
heads, each a fixed random projection to `head_dim` dims (our reading of the paper's per-head
projections; `head_dim=0` splits the dims instead); each head picks its nearest key; keys come from
k-means on unlabelled data (`init_from_data`) and stay frozen; the paired values are learnable.

The code holds one atom per head, index h·K + j, weight 1/heads: x̂ (or the logits) is the mean of the
fetched values, the paper's non-parametric average-pooling decoder. With `d_value = 0` the values live
in input space and the trainer fits them by reconstruction; with `d_value = classes` use `logits(x)` and
train `values` by cross-entropy (see bench/kv_incremental.py). Only fetched values get a gradient, which
is why learning new classes forgets little; with an optimizer without momentum, unfetched values stay
exactly still, so the trainer takes plain SGD steps here (`make_optimizer`: no momentum, no weight decay),
not Adam, whose moments keep moving a value for many steps after it was last fetched (tests/test_kvbottleneck.py
checks both). The run's lr is then SGD's factor on the gradient, not Adam's step size, and `betas` are unused:
reconstruction on FVU's unitless scale wants lr ≈ 10 (1e-2, fine for Adam, barely moves the values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, Output, register
from ..config import check, non_negative
from ..errors import SparsecodeError
from .kmeans import KMeansConfig, kmeans
from .search import nearest


@dataclass
class KVBottleneckConfig(KMeansConfig):
    m: int = 4096  # keys in all: heads × keys per head
    heads: int = 8
    head_dim: int = 8  # dims of each head's random projection; 0 = split d_in into `heads` equal parts
    d_value: int = 0  # width of the values; 0 = d_in (reconstruction)

    def validate(self) -> None:
        super().validate()
        check(self.heads > 0 and self.m % self.heads == 0, f"m={self.m} must be a multiple of heads={self.heads}")
        check(0 <= self.head_dim <= self.d_in, f"head_dim must be in 0..d_in={self.d_in}, got {self.head_dim}")
        check(self.head_dim > 0 or self.d_in % self.heads == 0,
              f"with head_dim=0, d_in={self.d_in} must be a multiple of heads={self.heads}")
        non_negative(self, "d_value")


@register("kvbottleneck")
class KVBottleneck(Coder):
    """Per-head nearest frozen key; the mean of the fetched learnable values is the output."""

    config_class = KVBottleneckConfig

    def __init__(self, cfg: KVBottleneckConfig):
        super().__init__(cfg)
        h, d = cfg.heads, cfg.d_in
        self.K = cfg.m // h
        if cfg.head_dim:
            proj = torch.linalg.qr(torch.randn(h, d, cfg.head_dim))[0]  # orthonormal columns
        else:  # split: head i sees dims [i·d/h, (i+1)·d/h)
            proj = torch.eye(d).reshape(d, h, d // h).permute(1, 0, 2)
        self.register_buffer("proj", proj.contiguous())  # [heads, d_in, head_dim]
        dh = proj.shape[2]
        self.register_buffer("keys", torch.randn(h, self.K, dh) / dh**0.5)
        self.values = nn.Parameter(torch.zeros(cfg.m, cfg.d_value or d))

    def heads_of(self, x: Tensor) -> Tensor:
        """[heads, B, head_dim] each head's view of x."""
        return torch.einsum("bd,hde->hbe", x, self.proj)

    def make_optimizer(self, params: list[nn.Parameter], lr: float, betas: tuple[float, float],
                       fused: bool | None) -> torch.optim.Optimizer:
        """Plain SGD (no momentum): a step changes exactly the values fetched in it."""
        return torch.optim.SGD(params, lr=lr, momentum=0.0, fused=fused)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        views = self.heads_of(x.detach())
        idx = torch.stack([nearest(views[h], self.keys[h], "l2", self.cfg.search_budget) + h * self.K
                           for h in range(self.cfg.heads)], 1)
        return Code(idx, torch.full(idx.shape, 1 / self.cfg.heads, device=x.device, dtype=x.dtype), self.cfg.m)

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.values)

    def atoms(self) -> Tensor:
        return self.values

    def logits(self, x: Tensor) -> Tensor:
        """[B, d_value] the mean of the fetched values (class scores when d_value = classes)."""
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> Output:
        if self.values.shape[1] != self.cfg.d_in:
            raise SparsecodeError("kvbottleneck: values of width d_value != d_in are class scores; "
                                  "train them with logits() and a classification loss, not by reconstruction")
        return super().forward(x)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Keys: k-means of each head's view of the (unlabelled) rows; values: the mean row of each key
        (reconstruction) or zero (class scores)."""
        views = self.heads_of(x)
        for h in range(self.cfg.heads):
            self.keys[h] = kmeans(views[h], self.K, self.cfg.kmeans_iters, "l2", self.generator, self.cfg.search_budget)
        self.values.zero_()
        if self.values.shape[1] == self.cfg.d_in:
            code = self.encode(x)
            counts = torch.bincount(code.indices.flatten(), minlength=self.cfg.m).clamp_min(1)
            sums = torch.zeros_like(self.values).index_add_(0, code.indices.flatten(),
                                                            x.repeat_interleave(self.cfg.heads, 0))
            self.values.copy_(sums / counts[:, None])
