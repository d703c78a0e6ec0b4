"""Evaluation of a trained method on held-out activations, through the Code seam alone."""

from __future__ import annotations

from typing import Any

import torch

from .coder import Coder
from .data.source import ActivationSource
from .errors import SparsecodeError
from .metrics import CodeStats, recovery


@torch.no_grad()
def evaluate(coder: Coder, source: ActivationSource, rows: int = 65536, batch_size: int = 4096) -> dict[str, Any]:
    """FVU, L0, usage and (where the source knows its ground truth) feature recovery."""
    if source.d != coder.cfg.d_in:
        raise SparsecodeError(f"the data has d={source.d} but the run expects d_in={coder.cfg.d_in}")
    device = next(iter(coder.buffers())).device
    was_training = coder.training
    coder.eval()
    stats = CodeStats(coder.cfg.m)
    done = 0
    while done < rows:
        x = source.next_batch(min(batch_size, rows - done)).to(device, torch.float32)
        if not torch.isfinite(x).all():
            raise SparsecodeError("the evaluation data contains NaN or inf values")
        code = coder.encode(x)
        stats.update(x, coder.decode(code), code)
        done += x.shape[0]
    coder.train(was_training)
    result: dict[str, Any] = {"rows": done, **stats.result()}
    truth = getattr(source, "truth", None)
    if truth is not None:
        result.update(recovery(coder.atoms().cpu(), truth))
    return result
