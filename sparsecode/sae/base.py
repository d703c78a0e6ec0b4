"""What every sparse autoencoder shares: tied-at-init encoder/decoder, unit-norm atoms, FVU loss."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder
from ..metrics import total_variance


def dense_to_code(z: Tensor, m: int) -> Code:
    """The non-zero entries of dense activations [B, m] as a Code (k = most non-zeros in one row).

    The encoder side already holds [B, m] pre-activations; this only packs them for the O(B·k·d) decoder.
    Gradients flow to `z` through the gathered values.
    """
    k = max(1, int((z != 0).sum(1).max()))
    _, indices = z.detach().abs().topk(k, dim=1, sorted=False)
    values = z.gather(1, indices)
    return Code(indices.masked_fill(values == 0, -1), values, m)


def per_row_scale(x: Tensor) -> Tensor:
    """√(‖x − mean‖² / B): the rms distance to the batch mean, to make penalties in x-units unitless."""
    return (total_variance(x) / x.shape[0]).sqrt()


class SAE(Coder):
    """z = f(W_enc (x − b_dec) + b_enc); x̂ = z · W_dec + b_dec, with the rows of W_dec kept unit-norm."""

    has_encoder: ClassVar[bool] = True  # False for methods whose encoder is the decoder itself (MP)
    unit_atoms: ClassVar[bool] = True  # False where a penalty uses the decoder norms instead (ReLU + L1)

    def __init__(self, cfg):
        super().__init__(cfg)
        w = torch.randn(cfg.m, cfg.d_in)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # [m, d]: one atom per row
        if self.has_encoder:
            self.W_enc = nn.Parameter(w.clone())  # encoder starts as the decoder's transpose
            self.b_enc = nn.Parameter(torch.zeros(cfg.m))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def pre_acts(self, x: Tensor) -> Tensor:
        """[B, m] dense pre-activations."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.W_dec, self.b_dec)

    def atoms(self) -> Tensor:
        return self.W_dec

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        self.b_dec.copy_(x.mean(0))

    @torch.no_grad()
    def after_backward(self) -> None:
        # keep only the gradient component orthogonal to each unit-norm atom
        g, w = self.W_dec.grad, self.W_dec
        if g is not None and self.unit_atoms:
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def after_step(self) -> None:
        if self.unit_atoms:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
