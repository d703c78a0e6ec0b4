"""Nested prefixes of the dictionary (the Matryoshka loss, after "Matryoshka representation learning"): a
loss any SAE's forward can add to its FVU, given its code and its decoder.

For each size s of `sizes` but the last (the whole dictionary, whose FVU the method already has), the
latents of the code below s must reconstruct x alone: fvu@s is the FVU of x̂ decoded from them only.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

from torch import Tensor

from ..code import Code
from ..config import check
from ..errors import SparsecodeError
from ..metrics import fvu


def parse_prefixes(text: str, m: int) -> list[int]:
    """'1/16,1/8,1' → sorted prefix sizes; each fraction in (0, 1] and the last one 1."""
    try:
        fracs = sorted({Fraction(part.strip()) for part in text.split(",") if part.strip()})
    except (ValueError, ZeroDivisionError):
        raise SparsecodeError(f"prefixes must be fractions like '1/16,1/4,1', got {text!r}") from None
    check(bool(fracs) and fracs[0] > 0 and fracs[-1] == 1,
          f"prefixes must be fractions in (0, 1] ending with 1, got {text!r}")
    return sorted({max(1, int(f * m)) for f in fracs})


def prefix_losses(x: Tensor, code: Code, sizes: list[int], decode: Callable[[Code], Tensor]) -> dict[str, Tensor]:
    """{"fvu@s": FVU of the code's latents below s alone} for each prefix size s but the last."""
    losses = {}
    for size in sizes[:-1]:
        inner = Code(code.indices.masked_fill(code.indices >= size, -1), code.values, code.size)
        losses[f"fvu@{size}"] = fvu(x, decode(inner))
    return losses
