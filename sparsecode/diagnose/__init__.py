"""Diagnostics: neural and posterior collapse (NC1–NC4; active units, KL per dim) and InfoMEC of codes
against ground-truth factors (`infomec.infomec` for any latents)."""

from .collapse import active_units, neural_collapse
from .infomec import code_infomec

__all__ = ["active_units", "code_infomec", "neural_collapse"]
