"""Sparse dictionaries: each module registers one method."""

from . import abstopk, batchtopk, gba, itda, jumprelu, matryoshka, mp, refit, relu, topafa, topk, vsae  # noqa: F401
