"""AbsTopK SAE ("AbsTopK: rethinking SAEs for bidirectional features"): signed hard thresholding.

One proximal step of ℓ0-constrained sparse coding: keep the k pre-activations of largest |value| with
their sign, no ReLU, so one latent can carry both ends of an axis (`select.abstopk`). AuxK works the same
way on |pre|. A registered config of the TopK SAE: its options and defaults are topk's.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..coder import register
from .topk import TopKConfig, TopKSAE


@dataclass
class AbsTopKConfig(TopKConfig):
    selection = "abstopk"  # a class constant, not an option


@register("abstopk")
class AbsTopKSAE(TopKSAE):
    """Top-k by magnitude, values kept signed."""

    config_class = AbsTopKConfig
