"""Refit SAE: TopK trained with a minimum-energy prior on its code; values refit by least squares at inference.

Training is TopK's (FVU + AuxK) plus `energy` · ‖z‖² / ‖x − x̄‖², a Gaussian prior on the code: of the
dictionaries that reconstruct alike it prefers the one whose codes carry least energy (the minimum-ℓ2
"method of frames" of "Atomic decomposition by basis pursuit", Chen, Donoho & Saunders). Reconstruction
alone does not tell a child feature c = cos φ·p + sin φ·u from its part orthogonal to the parent, u (both
rebuild every parent + child row), and plain TopK drifts towards u or to parent + child composites
(absorption); c is the pair with the smaller coefficients. The prior shrinks the encoder's values, so
`encode` keeps the atoms TopK picked and refits their values (the debiasing step of "Hard thresholding
pursuit: an algorithm for compressive sensing", Foucart): non-negative least squares on x − b_dec,
approximated by `rounds` solves that each drop the atoms whose value came out negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..code import Code
from ..coder import Output, register
from ..config import non_negative, positive
from ..metrics import fvu, total_variance
from .topk import TopKConfig, TopKSAE

RIDGE = 1e-4  # added to the Gram matrix of the picked unit atoms: a row's solve stays defined when two coincide


@dataclass
class RefitConfig(TopKConfig):
    energy: float = 0.1  # weight of the code energy ‖z‖² in training, on the FVU scale
    rounds: int = 2  # least-squares solves at inference, each after dropping the atoms that came out < 0

    def validate(self) -> None:
        super().validate()
        non_negative(self, "energy")
        positive(self, "rounds")


def refit(r: Tensor, atoms: Tensor, code: Code, rounds: int = 2) -> Code:
    """Non-negative least-squares values of rows r [B, d] on the atoms each row's code holds: `rounds` solves,
    each after dropping the atoms whose value came out negative (what the last leaves negative becomes an
    unused slot). Differentiable in r and atoms; reads nothing back from the device (`solve_ex` skips the
    singularity check, which the ridge makes needless)."""
    keep = code.active()
    rows = atoms[code.indices.clamp_min(0)]  # [B, k, d]
    eye = RIDGE * torch.eye(code.k, dtype=atoms.dtype, device=atoms.device)
    z = r.new_zeros(code.indices.shape)
    for _ in range(rounds):
        d = rows * keep[..., None].to(rows.dtype)
        z = torch.linalg.solve_ex(d @ d.transpose(1, 2) + eye, d @ r[..., None])[0][..., 0]
        keep = keep & (z.detach() > 0)
    return Code(code.indices.masked_fill(~keep, -1), z * keep, code.size)


@register("refit")
class RefitSAE(TopKSAE):
    """TopK + code energy while training; TopK's atoms with least-squares values at inference."""

    config_class = RefitConfig
    transcodes = False  # its refit solves for x − b_dec: it only reconstructs its input

    def encode(self, x: Tensor) -> Code:
        return self.fit(x, super().encode(x))

    def fit(self, x: Tensor, code: Code) -> Code:
        """The code's atoms, valued by non-negative least squares on x − b_dec."""
        return refit(x - self.b_dec, self.W_dec, code, self.cfg.rounds)

    def forward(self, x: Tensor) -> Output:
        out = super().forward(x)
        if self.training:
            if self.cfg.energy:
                out.losses["energy"] = self.cfg.energy * out.code.values.pow(2).sum() / total_variance(x)
            return out
        code = self.fit(x, out.code)  # eval: the code `encode` gives
        x_hat = self.decode(code)
        return Output(x_hat, code, {**out.losses, "fvu": fvu(x, x_hat)})
