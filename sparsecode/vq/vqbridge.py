"""VQBridge / FVQ ("Scalable training for VQ networks with 100% codebook utilization").

The codebook is the output of a compress–process–recover projector over a base codebook B:
compress: the K base codes are cut into K/g tokens of g consecutive codes, each token linearly embedded
into `hidden` dims; process: `depth` pre-norm transformer blocks (self-attention across the tokens,
so every code's gradient reaches every other; LayerNorm without affine, GELU MLP); recover: LayerNorm and
a zero-initialised linear layer back to g·d, un-grouped into K codes. Reading chosen (checked against
the authors' release, `qbridge_ViT.py`): there the codebook is laid out as a √K×√K image and cut into
p×p patches (ViT PatchEmbed, p = 4 → g = 16), 2 blocks, 4 heads of 16 dims, MLP ratio 2, no positional
embedding, base codebook frozen; grouping g consecutive codes is the same up to a relabelling of the
random base codes, and also works when K is not a square. The authors start the recover layer at zero (all
codes at one point, `init=zero`); by default (`init=kmeans`, our addition) the recover layer still starts at
zero and each code gets a frozen offset that puts the codebook on k-means centres of the data, which the
bridge then moves as one; `init=data` starts the recover layer at the data's scale, a random cloud that on
384-d activations collapses onto its few codes of smallest spread. Restarts split busy codes and `refine`
moves each used code's offset toward its rows' mean (base.py; `refine=0`: the authors'). The annealing
is the learning-rate schedule: train with the trainer's cosine decay down to a small `min_lr_ratio` (the
authors anneal to 0.01).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..coder import register
from ..config import check, non_negative, positive
from .base import OffsetConfig, Quantizer
from .kmeans import KMeansConfig


@dataclass
class VQBridgeConfig(OffsetConfig, KMeansConfig):
    group: int = 16  # g: consecutive codes per token (a 4×4 patch in the paper); m must divide by it
    hidden: int = 64  # token width (heads × 16 in the paper's "S" size)
    heads: int = 4
    depth: int = 2
    mlp_ratio: float = 2.0
    train_base: bool = False  # also train the base codebook (the paper keeps it frozen)
    init: str = "kmeans"  # kmeans (codes start on k-means centres) | data (a cloud at the data's mean and
    #                       per-dimension scale) | zero (the paper's)
    legacy: ClassVar[dict] = {"data_init": ("init", {True: "data", False: "zero"})}

    def validate(self) -> None:
        super().validate()
        check(self.group > 0 and self.m % self.group == 0,
              f"m={self.m} must be a multiple of group={self.group}")
        check(self.hidden > 0 and self.heads > 0 and self.hidden % self.heads == 0,
              f"hidden={self.hidden} must be a positive multiple of heads={self.heads}")
        non_negative(self, "depth")
        positive(self, "mlp_ratio")
        check(self.init in ("kmeans", "data", "zero"), f"init must be 'kmeans', 'data' or 'zero', got {self.init!r}")


class Block(nn.Module):
    """Pre-norm transformer block without affine LayerNorm: x + attn(ln x), then x + mlp(ln x)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, int(width * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(width * mlp_ratio), width))

    def forward(self, x: Tensor) -> Tensor:
        t, w = x.shape
        q, k, v = self.qkv(F.layer_norm(x, (w,))).view(t, 3, self.heads, w // self.heads).permute(1, 2, 0, 3)
        a = F.scaled_dot_product_attention(q, k, v)  # [heads, t, w/heads], memory-efficient kernel
        x = x + self.out(a.transpose(0, 1).reshape(t, w))
        return x + self.mlp(F.layer_norm(x, (w,)))


@register("vqbridge")
class VQBridge(Quantizer):
    """Codebook = recover(process(compress(base))), trained by the codebook loss."""

    config_class = VQBridgeConfig

    def __init__(self, cfg: VQBridgeConfig):
        super().__init__(cfg)
        base = torch.randn(cfg.m, cfg.d_in) / cfg.d_in**0.5
        self.base = nn.Parameter(base, requires_grad=cfg.train_base)
        g, d = cfg.group, cfg.d_in
        self.compress = nn.Linear(g * d, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.recover = nn.Linear(cfg.hidden, g * d)
        for lin in [self.compress, self.recover, *(m for b in self.blocks for m in b.modules()
                                                   if isinstance(m, nn.Linear))]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.recover.weight)  # as the authors: the codebook starts at the recover bias

    def computed(self) -> Tensor:
        cfg = self.cfg
        h = self.compress(self.base.reshape(cfg.m // cfg.group, cfg.group * cfg.d_in))
        for block in self.blocks:
            h = block(h)
        h = self.recover(F.layer_norm(h, (cfg.hidden,)))
        return h.reshape(cfg.m, cfg.d_in)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Start the codebook on the data (our addition): on k-means centres (`init=kmeans`), or with the recover
        bias at the data mean and its weight random at the data's per-dimension scale (`init=data`)."""
        cfg = self.cfg
        if cfg.init == "zero":
            return
        if cfg.init == "kmeans":
            return self.start_at_kmeans(x, cfg.kmeans_iters)
        self.recover.bias.copy_(x.mean(0).repeat(cfg.group))
        scale = x.std(0).repeat(cfg.group)[:, None] / cfg.hidden**0.5  # LayerNorm'd tokens have unit variance
        self.recover.weight.copy_(self.randn(*self.recover.weight.shape, device=x.device) * scale)
        self.clear_cache()
