"""ITDA ("Inference-time decomposition of activations"): a dictionary of real activations, no gradients.

Build: each incoming chunk of `chunk` rows is approximated by k steps of (signed, classic) matching
pursuit over the current dictionary; every row whose relative error ‖r‖/‖x‖ exceeds `max_error` becomes
a new atom, normalised, until m atoms are held. Chunks make the greedy pass sequential at that grain
(rows of one chunk can both enter). Each atom keeps its source index: its row's position in the stream
of rows the method was fed (the trainer's init sample first, then the training batches), stored in the
checkpoint as the buffer `source_index` (−1 for empty slots). Building happens in the training forward
(and on the init sample); there are no parameters, so the trainer takes no optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..code import Code, decode
from ..coder import Coder, Output, SparseConfig, register
from ..config import check, positive
from .mp import matching_pursuit


@dataclass
class ITDAConfig(SparseConfig):
    k: int = 32  # matching-pursuit steps
    max_error: float = 0.3  # relative ℓ2 error above which a row joins the dictionary
    chunk: int = 64  # rows approximated together before the dictionary grows

    def validate(self) -> None:
        super().validate()
        check(0 < self.max_error < 1, f"max_error must be in (0, 1), got {self.max_error}")
        positive(self, "chunk")


@register("itda")
class ITDA(Coder):
    """Greedy dictionary of normalised activations, matching-pursuit encoder."""

    config_class = ITDAConfig

    def __init__(self, cfg: ITDAConfig):
        super().__init__(cfg)
        self.register_buffer("W_dec", torch.zeros(cfg.m, cfg.d_in))
        self.register_buffer("source_index", torch.full((cfg.m,), -1, dtype=torch.long))
        self.register_buffer("n_atoms", torch.zeros((), dtype=torch.long))
        self.register_buffer("rows_seen", torch.zeros((), dtype=torch.long))

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        indices, values, _ = matching_pursuit(x, self.W_dec, self.cfg.k, signed=True)
        return Code(indices, values, self.cfg.m)

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.W_dec)

    def atoms(self) -> Tensor:
        return self.W_dec

    @torch.no_grad()
    def grow(self, x: Tensor) -> None:
        """Add the rows of `x` that the dictionary approximates badly, chunk by chunk, without reading the
        atom count back from the device: each chunk runs k rounds of matching pursuit over all m slots (empty
        slots are zero and never picked; rounds past the count change nothing), and the rows that join fill
        the next free slots in order (none once the dictionary is full, though the pursuit still runs)."""
        m, slots = self.cfg.m, torch.arange(self.cfg.m, device=x.device)
        for start in range(0, x.shape[0], self.cfg.chunk):
            part = x[start : start + self.cfg.chunk]
            n = self.n_atoms
            _, _, r = matching_pursuit(part, self.W_dec, self.cfg.k, signed=True, limit=n)
            norms = part.norm(dim=1)
            ranks = ((r.norm(dim=1) > self.cfg.max_error * norms) & (norms > 0)).cumsum(0)  # joiners so far
            joined = torch.minimum(ranks[-1], m - n)  # as many as there are free slots
            take = (slots >= n) & (slots < n + joined)  # slot n + j takes the (j+1)-th joining row
            row = torch.searchsorted(ranks, (slots - n + 1).clamp_min(1)).clamp_max(part.shape[0] - 1)
            self.W_dec.copy_(torch.where(take[:, None], F.normalize(part, dim=1)[row], self.W_dec))
            self.source_index.copy_(torch.where(take, self.rows_seen + start + row, self.source_index))
            self.n_atoms += joined
        self.rows_seen += x.shape[0]

    def init_from_data(self, x: Tensor) -> None:
        self.grow(x)

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        if self.training:
            self.grow(x)
        out = self.reconstruct(x, self.encode(x))
        out.stats["atoms"] = self.n_atoms.float()  # stays on the device until logged
        return out
