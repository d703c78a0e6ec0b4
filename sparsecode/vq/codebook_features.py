"""Codebook features (Tamkin et al.): replace an activation by the sum of the k codes of a large codebook
most similar to it (cosine), weight 1 each; the codebook learns by the reconstruction loss, so only the
chosen codes move. Codes start from data rows scaled by 1/k (our choice), so k similar codes sum to about
one row. Top-k search is chunked: never a [B, m] similarity matrix over `search_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, SparseConfig, register
from .kmeans import sample_rows
from .search import SearchConfig, most_similar


@dataclass
class CodebookFeaturesConfig(SearchConfig, SparseConfig):
    k: int = 8  # codes summed per row


@register("codebook_features")
class CodebookFeatures(Coder):
    """x̂ = sum of the k most cosine-similar codes."""

    config_class = CodebookFeaturesConfig

    def __init__(self, cfg: CodebookFeaturesConfig):
        super().__init__(cfg)
        self.codebook = nn.Parameter(torch.randn(cfg.m, cfg.d_in) / (cfg.d_in**0.5 * cfg.k))

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        idx = most_similar(x.detach(), self.codebook.detach(), self.cfg.k, self.cfg.search_budget)
        return Code.ones(idx, self.cfg.m, x.dtype)

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.codebook)

    def atoms(self) -> Tensor:
        return self.codebook

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        idx = sample_rows(x.shape[0], self.cfg.m, self.generator)  # distinct rows: duplicate codes would tie
        self.codebook.copy_(x[idx.to(x.device)] / self.cfg.k)
