"""The held-out scoring the peers' contender scripts share: sparsecode's CodeStats over a store's held-out rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sparsecode.code import Code
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.metrics import CodeStats


@torch.no_grad()
def held_out_stats(cfg: SourceConfig, m: int, rows: int, forward: Callable[[Tensor], tuple[Tensor, Code]]) -> CodeStats:
    """CodeStats of a peer's `forward` (rows → reconstruction, Code) over the first `rows` held-out rows."""
    held = open_source(cfg, "eval")
    stats, done = CodeStats(m), 0
    rows = min(rows, len(held))
    while done < rows:
        x = held.next_batch(min(4096, rows - done)).float()
        stats.update(x, *forward(x))
        done += x.shape[0]
    return stats
