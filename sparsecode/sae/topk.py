"""TopK SAE (Gao et al. 2024): ReLU, keep the k largest; AuxK loss revives dead latents.

AuxK: the residual x − x̂ is reconstructed by the top `aux_k` latents among those dead for
`dead_tokens` tokens, weighted by `aux_coef` (1/32 in the paper); both losses share the FVU scale.

With `sparse_grad` (the default) the [B, m] pre-activations are scored without autograd and only the
picked ones are made differentiable (kernels/sparse_encoder.py): the encoder's backward costs O(B·k·d)
instead of two dense matmuls. `sparse_grad=false` is the dense reference path; both give the same
gradients (tests/test_kernels.py, tests/test_topk.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..code import Code, decode
from ..coder import CoderConfig, Output, register
from ..config import check
from ..kernels.sparse_encoder import picked, pre_acts
from ..metrics import fvu, total_variance
from .base import SAE


@dataclass
class TopKConfig(CoderConfig):
    k: int = 32  # active latents per token
    aux_k: int | None = None  # dead latents used by AuxK; None → d_in // 2
    aux_coef: float = 1 / 32
    sparse_grad: bool = True  # encoder gradients only for the picked latents (False: dense reference)

    def validate(self) -> None:
        super().validate()
        check(0 < self.k <= self.m, f"k must be in 1..m={self.m}, got k={self.k}")
        check(self.aux_k is None or self.aux_k > 0, f"aux_k must be positive, got {self.aux_k}")
        check(self.aux_coef >= 0, f"aux_coef must be non-negative, got {self.aux_coef}")


@register("topk")
class TopKSAE(SAE):
    """ReLU then top-k of the pre-activations; x̂ sums the k chosen decoder rows."""

    config_class = TopKConfig
    aux_fill: ClassVar[float] = float("-inf")  # what hides live latents from AuxK's top-k

    def pick(self, pre: Tensor, k: int) -> Code:
        """The k largest pre-activations of each row, after ReLU."""
        values, indices = pre.topk(k, dim=1, sorted=False)
        return Code(indices, values.relu(), self.cfg.m)

    def select(self, pre: Tensor) -> Code:
        return self.pick(pre, self.cfg.k)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return self.select(self.pre_acts(x))

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        pre = self.train_pre_acts(x)
        return self.output(x, pre, self.attach(x, self.select(pre)))

    def train_pre_acts(self, x: Tensor) -> Tensor:
        """[B, m] pre-activations for selection: without autograd on the sparse-gradient path."""
        if self.cfg.sparse_grad:
            return pre_acts(x - self.b_dec, self.W_enc, self.b_enc)
        return self.pre_acts(x)

    def attach(self, x: Tensor, code: Code) -> Code:
        """On the sparse-gradient path, make the code's values differentiable in the encoder again: each
        active value is its pre-activation (ReLU, top-k and thresholds only zero the others)."""
        if not self.cfg.sparse_grad:
            return code
        active = code.active()
        values = picked(x - self.b_dec, self.W_enc, self.b_enc, code.indices.clamp_min(0), code.values)
        return Code(code.indices, values * active, code.size)

    def output(self, x: Tensor, pre: Tensor, code: Code) -> Output:
        """FVU, plus AuxK and dead-latent tracking in training."""
        x_hat = self.decode(code)
        losses = {"fvu": fvu(x, x_hat)}
        if self.training:
            aux = self.aux_loss(x, x_hat, pre)
            if aux is not None:
                losses["auxk"] = self.cfg.aux_coef * aux
            self.track(code)
        return Output(x_hat, code, losses)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor) -> Tensor | None:
        """Reconstruct the residual with the top latents among the dead ones (None if none is dead).

        Nothing waits for the device (`idle_count`): on the CPU the number dead is read, k_aux = min(aux_k,
        dead). On a GPU only a bound on the longest idle time is known on the host: None while it is below
        dead_tokens, then always k_aux = min(aux_k, m) slots, those that fall on live latents weighing zero
        (the loss is zero when none is dead), as in the paper's reference code.
        """
        longest, n_dead = self.idle_count()
        if longest < self.cfg.dead_tokens or n_dead == 0:
            return None
        dead = self.dead_mask()
        k_aux = min(self.cfg.aux_k or self.cfg.d_in // 2, self.cfg.m if n_dead is None else n_dead)
        residual = (x - x_hat).detach()
        top = self.pick(pre.masked_fill(~dead, self.aux_fill), k_aux)
        if n_dead is None:  # slots beyond the dead latents hold live ones: weight zero
            top = Code(top.indices, top.values * dead[top.indices], self.cfg.m)
        r_hat = decode(self.attach(x, top), self.W_dec)
        loss = (residual - r_hat).pow(2).sum() / total_variance(x)
        return loss if n_dead is not None else dead.any() * loss
