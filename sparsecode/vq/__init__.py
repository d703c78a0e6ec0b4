"""Codebooks (vector quantization): each module registers one method."""

from . import (  # noqa: F401
    codebook_features,
    factorized,
    frozen_projector,
    fsq,
    kvbottleneck,
    latentquant,
    lfq,
    rvq,
    simvq,
    vq,
    vqbridge,
)
