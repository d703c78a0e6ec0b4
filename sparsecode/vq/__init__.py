"""Codebooks (vector quantization): each module registers one method."""

from . import vq  # noqa: F401
