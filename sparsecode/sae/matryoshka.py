"""Matryoshka SAE (after "Matryoshka representation learning"): nested prefixes of the dictionary.

The first ⌈f·m⌉ latents, for each fraction f of `prefixes`, must each reconstruct x alone from the
latents of the shared selection that fall in the prefix; the loss is the sum of their FVUs (the full
dictionary included), so early latents learn general directions and later ones specialise (nested.py).
Selection is TopK or BatchTopK (`selection`), with AuxK on the full dictionary as in TopK, 4× as strong and over
a window half as long: the latents of the outer prefixes fire rarely, and TopK's AuxK left 3.5% of them dead on
MiniLM (BENCHMARKS.md). A registered config of the TopK SAE; it holds BatchTopK's inference threshold whatever
its selection (as it always has), calibrated after the last step as batchtopk's where the selection uses it
(`calibration_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..coder import register
from ..config import check
from .batchtopk import BatchTopKConfig
from .topk import TopKSAE


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    prefixes: str = "1/16,1/8,1/4,1/2,1"  # fractions of m, comma-separated
    aux_coef: float = 0.125  # AuxK's weight: 4× TopK's 1/32, as its outer latents fire rarely
    selection: str = "batchtopk"  # topk | batchtopk

    def validate(self) -> None:
        check(self.selection in ("topk", "batchtopk"),
              f"selection must be 'topk' or 'batchtopk', got {self.selection!r}")
        super().validate()


@register("matryoshka")
class MatryoshkaSAE(TopKSAE):
    """One selection, one FVU per nested prefix of the dictionary."""

    config_class = MatryoshkaConfig
    dead_window_parts = 40  # AuxK's window a fortieth of the run (TopK's a twentieth), for the same reason
