"""What the per-dimension quantizers share (fsq, lfq, latentquant): z = W_in x + b_in, each of the m
dimensions quantized on its own, x̂ = Σ_j q_j · W_out[j] + b_out.

The code has one slot per dimension (index j, value q_j, a zero level leaves its slot inactive), the
atoms are the rows of W_out. The implicit code is the tuple of levels: `code_ids(code)` turns it into one
mixed-radix integer per row (∏ levels < 2⁶³), so usage can be counted over the implicit codebook.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, Output
from ..metrics import fvu


class ScalarQuantizer(Coder):
    """Linear in, per-dimension quantization with a straight-through gradient, linear out."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.W_in = nn.Parameter(torch.randn(cfg.m, cfg.d_in) / cfg.d_in**0.5)
        self.b_in = nn.Parameter(torch.zeros(cfg.m))
        self.W_out = nn.Parameter(torch.randn(cfg.m, cfg.d_in) / cfg.m**0.5)  # [m, d]: one atom per row
        self.b_out = nn.Parameter(torch.zeros(cfg.d_in))

    # --- what each method defines ---------------------------------------------------------------
    def levels(self) -> list[int]:
        """Number of levels of each dimension."""
        raise NotImplementedError

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """([B, m] quantized values with a straight-through gradient to z, [B, m] level indices)."""
        raise NotImplementedError

    def level_index(self, values: Tensor) -> Tensor:
        """[B, m] level index of each quantized value."""
        raise NotImplementedError

    def extra_losses(self, z: Tensor, q: Tensor, idx: Tensor) -> dict[str, Tensor]:
        return {}

    # --- the seam -------------------------------------------------------------------------------
    def project(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_in, x - self.b_out, self.W_in.t())

    def make_code(self, q: Tensor) -> Code:
        idx = torch.arange(self.cfg.m, device=q.device).expand(q.shape[0], -1)
        return Code(idx, q, self.cfg.m)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return self.make_code(self.quantize(self.project(x))[0].detach())

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.W_out, self.b_out)

    def atoms(self) -> Tensor:
        return self.W_out

    def code_ids(self, code: Code) -> Tensor:
        """[B] the implicit code of each row: its level indices read as one mixed-radix number."""
        levels = self.levels()
        if math.prod(levels) >= 2**63:
            raise ValueError(f"{self.name}: {math.prod(levels)} implicit codes do not fit a 64-bit index")
        idx = self.level_index(code.values)  # slot j holds dimension j
        radix = torch.tensor([math.prod(levels[j + 1:]) for j in range(len(levels))], device=idx.device)
        return (idx * radix).sum(1)

    def implicit_size(self) -> int:
        return math.prod(self.levels())

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        z = self.project(x)
        q, idx = self.quantize(z)
        code = self.make_code(q)  # values keep the straight-through gradient into the encoder
        x_hat = self.decode(code)
        losses = {"fvu": fvu(x, x_hat), **self.extra_losses(z, q, idx)}
        if self.training:
            self.track(code)
        return Output(x_hat, code, losses)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        self.b_out.copy_(x.mean(0))
