"""Memory-bounded nearest-code search: chunks of codes (and rows), never a [B, K] matrix over budget.

On CUDA with Triton installed, `nearest` runs the fused kernel of `kernels/nearest.py` (no distance matrix
at all); the chunked PyTorch search below is its reference and the fallback everywhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..coder import CoderConfig
from ..config import check

# Default block size in elements (4 MiB of fp32): cache-sized blocks, which also cap the search's extra memory
# (the measured choice: BENCHMARKS.md, "Notes moved from the code").
BUDGET = 1 << 20


@dataclass
class SearchConfig(CoderConfig):
    """The options of every method that searches its codebook."""

    search_budget: int = BUDGET  # most elements in one [rows, codes] distance block

    def validate(self) -> None:
        super().validate()
        check(self.search_budget >= 1, f"search_budget must be positive, got {self.search_budget}")


def blocks(n: int, k: int, budget: int) -> tuple[int, int]:
    """(rows, codes) of one distance block, so that rows · codes ≤ budget (at least one of each)."""
    rows = max(1, min(n, budget))
    return rows, max(1, min(k, budget // rows))


@torch.no_grad()
def nearest(x: Tensor, codes: Tensor, metric: str = "l2", budget: int = BUDGET, fused: bool = True) -> Tensor:
    """[B] index of each row's nearest code (L2, or cosine); distance blocks hold ≤ `budget` elements."""
    if metric == "cosine":
        x, codes = F.normalize(x, dim=1), F.normalize(codes, dim=1)
    if fused and x.shape[0] > 0 and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from ..kernels import nearest as kernel  # imports Triton only where it can run

        if kernel.triton is not None:
            return kernel.nearest_fused(x, codes)
    return nearest_chunked(x, codes, budget)


@torch.no_grad()
def nearest_chunked(x: Tensor, codes: Tensor, budget: int = BUDGET) -> Tensor:
    """The PyTorch reference of `nearest` (L2): distance blocks of at most `budget` elements."""
    n, k = x.shape[0], codes.shape[0]
    sq = codes.pow(2).sum(1)
    rows, cols = blocks(n, k, budget)
    out = torch.empty(n, dtype=torch.long, device=x.device)
    for r in range(0, n, rows):
        xr = x[r : r + rows]
        best = torch.full((xr.shape[0],), float("inf"), device=x.device, dtype=x.dtype)
        best_idx = torch.zeros(xr.shape[0], dtype=torch.long, device=x.device)
        for c in range(0, k, cols):
            # ‖x − c‖² up to the row constant ‖x‖²
            d = torch.addmm(sq[c : c + cols], xr, codes[c : c + cols].t(), alpha=-2)
            v, i = d.min(1)
            better = v < best
            best = torch.where(better, v, best)
            best_idx = torch.where(better, i + c, best_idx)
        out[r : r + rows] = best_idx
    return out


@torch.no_grad()
def most_similar(x: Tensor, codes: Tensor, k: int, budget: int = BUDGET) -> Tensor:
    """[B, k] indices of each row's k codes of highest cosine similarity, best first, in bounded blocks."""
    x, codes = F.normalize(x, dim=1), F.normalize(codes, dim=1)
    n, m = x.shape[0], codes.shape[0]
    rows, cols = blocks(n, m, budget)
    cols = max(cols, min(k, m))  # a block must hold k candidates besides the running best
    out = torch.empty(n, k, dtype=torch.long, device=x.device)
    for r in range(0, n, rows):
        xr = x[r : r + rows]
        best = xr.new_full((xr.shape[0], 0), float("-inf"))
        best_idx = torch.zeros(xr.shape[0], 0, dtype=torch.long, device=x.device)
        for c in range(0, m, cols):
            sim = xr @ codes[c : c + cols].t()
            v, i = sim.topk(min(k, sim.shape[1]), dim=1)
            v, i = torch.cat([best, v], 1), torch.cat([best_idx, i + c], 1)
            best, pick = v.topk(min(k, v.shape[1]), dim=1)
            best_idx = i.gather(1, pick)
        out[r : r + rows] = best_idx
    return out
