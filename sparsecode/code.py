"""The seam every method shares: a `Code` (which atoms, with which weights) and its decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Code:
    """k atoms per row of a dictionary of `size` atoms; index -1 marks an unused slot."""

    indices: Tensor  # [B, k] long
    values: Tensor  # [B, k]
    size: int  # m, atoms in the dictionary

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape or self.indices.ndim != 2:
            raise ValueError(f"Code needs indices and values of one [B, k] shape, got "
                             f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}")

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def active(self) -> Tensor:
        """[B, k] bool: slots that hold an atom with a non-zero weight."""
        return (self.indices >= 0) & (self.values != 0)

    def l0(self) -> Tensor:
        """[B] number of active atoms per row."""
        return self.active().sum(1)

    def counts(self) -> Tensor:
        """[m] how many rows each atom is active in: a scatter-add of fixed size, so nothing is read back
        from the device (bincount of the active indices would size its output from their maximum)."""
        active = self.active().long()
        out = torch.zeros(self.size, dtype=torch.long, device=self.indices.device)
        if self.indices.shape[0] and self.indices.stride(0) == 0:  # every row holds one index row (full width)
            return out.scatter_add_(0, self.indices[0].clamp_min(0), active.sum(0))
        return out.scatter_add_(0, self.indices.clamp_min(0).flatten(), active.flatten())

    def to_dense(self) -> Tensor:
        """[B, m] dense matrix of weights; for tests and small analyses, never on the hot path."""
        dense = self.values.new_zeros(self.indices.shape[0], self.size)
        rows = torch.arange(self.indices.shape[0], device=self.indices.device)[:, None].expand_as(self.indices)
        values = self.values.masked_fill(self.indices < 0, 0)  # unused slots add zero to atom 0
        return dense.index_put_((rows, self.indices.clamp_min(0)), values, accumulate=True)

    @classmethod
    def ones(cls, indices: Tensor, size: int, dtype: torch.dtype = torch.float32) -> Code:
        """Atoms picked with weight 1 (codebooks): indices [B] (one per row) or [B, k]."""
        indices = indices[:, None] if indices.ndim == 1 else indices
        return cls(indices, torch.ones(indices.shape, device=indices.device, dtype=dtype), size)

    def detach(self) -> Code:
        return Code(self.indices, self.values.detach(), self.size)


def decode(code: Code, atoms: Tensor, bias: Tensor | None = None) -> Tensor:
    """x̂ = Σ_j values[:, j] · atoms[indices[:, j]] (+ bias), in O(B·k·d) through embedding_bag."""
    idx, val = code.indices, code.values.to(atoms.dtype)
    unused = idx < 0
    idx = idx.masked_fill(unused, 0)
    val = val.masked_fill(unused, 0)
    out = F.embedding_bag(idx, atoms, per_sample_weights=val, mode="sum")
    return out if bias is None else out + bias
