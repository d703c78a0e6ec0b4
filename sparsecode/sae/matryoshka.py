"""Matryoshka SAE (after "Matryoshka representation learning"): nested prefixes of the dictionary.

The first ⌈f·m⌉ latents, for each fraction f of `prefixes`, must each reconstruct x alone from the
latents of the shared selection that fall in the prefix; the loss is the sum of their FVUs (the full
dictionary included), so early latents learn general directions and later ones specialise. Selection
is TopK or BatchTopK (`selection`), with AuxK on the full dictionary as in TopK.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from torch import Tensor

from ..code import Code
from ..coder import Output, register
from ..config import check
from ..errors import SparsecodeError
from ..metrics import fvu
from .batchtopk import BatchTopKConfig, BatchTopKSAE


def parse_prefixes(text: str, m: int) -> list[int]:
    """'1/16,1/8,1' → sorted prefix sizes; each fraction in (0, 1] and the last one 1."""
    try:
        fracs = sorted({Fraction(part.strip()) for part in text.split(",") if part.strip()})
    except (ValueError, ZeroDivisionError):
        raise SparsecodeError(f"prefixes must be fractions like '1/16,1/4,1', got {text!r}") from None
    check(bool(fracs) and fracs[0] > 0 and fracs[-1] == 1,
          f"prefixes must be fractions in (0, 1] ending with 1, got {text!r}")
    sizes = sorted({max(1, int(f * m)) for f in fracs})
    return sizes


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    prefixes: str = "1/16,1/8,1/4,1/2,1"  # fractions of m, comma-separated
    selection: str = "batchtopk"  # topk | batchtopk

    def validate(self) -> None:
        super().validate()
        check(self.selection in ("topk", "batchtopk"),
              f"selection must be 'topk' or 'batchtopk', got {self.selection!r}")
        parse_prefixes(self.prefixes, self.m)


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    """One selection, one FVU per nested prefix of the dictionary."""

    config_class = MatryoshkaConfig

    def __init__(self, cfg: MatryoshkaConfig):
        super().__init__(cfg)
        self.sizes = parse_prefixes(cfg.prefixes, cfg.m)

    def batch_select(self, pre: Tensor) -> Code:
        return super().batch_select(pre) if self.cfg.selection == "batchtopk" else self.pick(pre, self.cfg.k)

    def select(self, pre: Tensor) -> Code:
        return super().select(pre) if self.cfg.selection == "batchtopk" else self.pick(pre, self.cfg.k)

    def forward(self, x: Tensor) -> Output:
        out = super().forward(x)
        code = out.code
        for size in self.sizes[:-1]:
            inner = Code(code.indices.masked_fill(code.indices >= size, -1), code.values, code.size)
            out.losses[f"fvu@{size}"] = fvu(x, self.decode(inner))
        return out
