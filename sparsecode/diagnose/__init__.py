"""Collapse diagnostics: neural collapse (NC1–NC4) and posterior collapse (active units, KL per dim)."""

from .collapse import active_units, neural_collapse

__all__ = ["active_units", "neural_collapse"]
