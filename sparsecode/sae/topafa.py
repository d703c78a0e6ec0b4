"""top-AFA SAE (Lee et al. 2025, "Evaluating and designing SAEs by approximating quasi-orthogonality").

No fixed k. Reading of the stopping rule (from the authors' code, SewoongLee/top-afa-sae): sort the ReLU
activations (times their atom's norm; ours are 1) in decreasing order, take the running ℓ2 norm of the
kept prefix, and keep the prefix whose norm is closest to the dense input's norm ‖x − b_dec‖ (argmin of
the absolute gap, at least one latent): `select.topafa`. AFA loss: afa_coef · mean_b (‖z_b‖₂ − ‖x_b − b_dec‖₂)², which
we divide by the batch's mean squared distance to its mean to share FVU's unitless scale; the authors
use the uncentred ‖x‖ in the loss, we use x − b_dec in both places, the vector the code reconstructs.
`k` here is only the slot cap: the most latents one row may keep. AuxK as in TopK (auxk.py). With
`sparse_grad` (the default, as in TopK) the encoder's gradient reaches only the kept latents (`attach`);
`false` is the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..code import Code
from ..coder import Output, register
from ..config import non_negative
from ..metrics import total_variance
from . import select
from .auxk import AuxKConfig, AuxKSAE


@dataclass
class TopAFAConfig(AuxKConfig):
    k: int = 64  # slot cap per row, not the sparsity
    sparse_grad: bool = True  # encoder gradients only for the kept latents (False: dense reference)
    afa_coef: float = 1 / 32

    def validate(self) -> None:
        super().validate()
        non_negative(self, "afa_coef")


@register("topafa")
class TopAFASAE(AuxKSAE):
    """Keep the largest activations while their ℓ2 norm approaches the input's."""

    config_class = TopAFAConfig

    def select_for(self, pre: Tensor, target: Tensor) -> Code:
        """`select.topafa` with this SAE's slot cap: the prefix whose norm is closest to `target` [B]."""
        return select.topafa(pre, target, self.cfg.k, self.cfg.m)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return self.select_for(self.pre_acts(x), (x - self.b_dec).norm(dim=1))

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        sparse = self.cfg.sparse_grad
        pre, target = self.pre_acts(x, grad=not sparse), (x - self.b_dec).norm(dim=1)
        code = self.select_for(pre, target.detach())
        out = self.sparse_output(x, pre, self.attach(x, code) if sparse else code, select.RELU_TOPK, sparse)
        gap = out.code.values.norm(dim=1) - target.detach()
        out.losses["afa"] = self.cfg.afa_coef * gap.pow(2).sum() / total_variance(x)
        return out
