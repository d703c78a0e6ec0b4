"""AbsTopK SAE ("AbsTopK: rethinking SAEs for bidirectional features"): signed hard thresholding.

One proximal step of ℓ0-constrained sparse coding: keep the k pre-activations of largest |value| with
their sign, no ReLU, so one latent can carry both ends of an axis. AuxK works the same way on |pre|.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..code import Code
from ..coder import register
from .topk import TopKSAE


@register("abstopk")
class AbsTopKSAE(TopKSAE):
    """Top-k by magnitude, values kept signed."""

    aux_fill: ClassVar[float] = 0.0  # |0| never outranks a dead latent's pre-activation

    def pick(self, pre: Tensor, k: int) -> Code:
        indices = pre.detach().abs().topk(k, dim=1, sorted=False).indices
        return Code(indices, pre.gather(1, indices), self.cfg.m)
