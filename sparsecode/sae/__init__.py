"""Sparse dictionaries: each module registers one method."""

from . import topk  # noqa: F401
