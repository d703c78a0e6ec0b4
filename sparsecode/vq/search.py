"""Memory-bounded nearest-code search: chunks of codes (and rows), never a [B, K] matrix over budget."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def nearest(x: Tensor, codes: Tensor, metric: str = "l2", budget: int = 1 << 24) -> Tensor:
    """[B] index of each row's nearest code (L2, or cosine); distance blocks hold ≤ `budget` elements."""
    if metric == "cosine":
        x, codes = F.normalize(x, dim=1), F.normalize(codes, dim=1)
    n, k = x.shape[0], codes.shape[0]
    sq = codes.pow(2).sum(1)
    rows = max(1, min(n, budget))
    cols = max(1, min(k, budget // rows))
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
