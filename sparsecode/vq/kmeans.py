"""k-means for codebook initialisation: D² seeding in growing parallel rounds, then Lloyd steps.

The seeding is the k-means‖ idea (Bahmani et al. 2012: many centres drawn ∝ D² in one round) without its
oversampling and reclustering: at the trainer's sample of 2K rows the candidate set would be the sample
itself. Instead each round draws ⌈chosen / GROWTH⌉ new centres ∝ D² without replacement (one exponential
race), so early rounds are k-means++ one centre at a time and the whole seeding takes O(GROWTH · ln K)
rounds of batched distance updates: the distance work of one Lloyd step. Deterministic from the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import non_negative
from .search import BUDGET, SearchConfig, nearest


@dataclass
class KMeansConfig(SearchConfig):
    """The options of every method that starts from k-means of the data."""

    kmeans_iters: int = 10  # Lloyd iterations after seeding

    def validate(self) -> None:
        super().validate()
        non_negative(self, "kmeans_iters")


GROWTH = 8  # a round draws a 1/GROWTH share of the centres already chosen (1 per round up to GROWTH)
ROWS = 2048  # rows per nearest-centre call on the CPU: blocks of ROWS × budget/ROWS, not n × budget/n


def sample_rows(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """[k] indices of distinct rows out of n (all n, then repeats, when k > n), on the CPU."""
    idx = torch.randperm(n, generator=generator)[:k]
    if n < k:
        idx = torch.cat([idx, torch.randint(n, (k - n,), generator=generator)])
    return idx


@torch.no_grad()
def assign(x: Tensor, centres: Tensor, metric: str = "l2", budget: int = BUDGET) -> Tensor:
    """[n] index of each row's nearest centre; on the CPU in row chunks, so distance blocks stay wide."""
    if x.is_cuda or x.shape[0] <= ROWS:
        return nearest(x, centres, metric, budget)
    return torch.cat([nearest(x[r : r + ROWS], centres, metric, budget) for r in range(0, x.shape[0], ROWS)])


@torch.no_grad()
def min_d2(x: Tensor, sq: Tensor, centres: Tensor, budget: int = BUDGET) -> Tensor:
    """[n] squared distance of each row of x (‖x‖² = sq) to its nearest centre, in blocks of ≤ `budget`."""
    csq = centres.pow(2).sum(1)
    cols = min(centres.shape[0], max(1, math.isqrt(budget)))  # square blocks: a wide matmul at any k
    rows = min(x.shape[0], max(1, budget // cols))
    out = torch.empty_like(sq)
    for r in range(0, x.shape[0], rows):
        best = None
        for c in range(0, centres.shape[0], cols):
            d = torch.addmm(csq[c : c + cols], x[r : r + rows], centres[c : c + cols].t(), alpha=-2).amin(1)
            best = d if best is None else torch.minimum(best, d)
        out[r : r + rows] = best
    return (out + sq).clamp_min_(0)


@torch.no_grad()
def seed(x: Tensor, k: int, generator: torch.Generator | None = None, budget: int = BUDGET,
         growth: int = GROWTH) -> Tensor:
    """[k] row indices of x (distinct when k ≤ n) drawn ∝ D² in rounds of ⌈chosen / growth⌉ centres.

    Random numbers come from `generator` on the CPU (the same draws on any device); k ≥ n rows: all rows,
    then repeats. `growth` = 1 doubles the centres each round; `growth` ≥ k draws one a round: k-means++.
    """
    n = x.shape[0]
    if k >= n:
        return sample_rows(n, k, generator).to(x.device)
    x = x.float() - x.float().mean(0)  # D² is shift-invariant; centred rows keep the distances accurate
    first = torch.randint(n, (1,), generator=generator).to(x.device)
    chosen, count = [first], 1
    sq = x.pow(2).sum(1)
    d2 = (x - x[first]).pow(2).sum(1)
    d2[first] = 0
    while count < k:
        b = min(k - count, -(-count // growth))
        e = -torch.log1p(-torch.rand(n, generator=generator)).to(x.device)  # Exp(1) race: smallest e / D²
        key = torch.where(d2 > 0, e / d2.clamp_min(torch.finfo(d2.dtype).tiny), torch.inf)
        new = key.topk(b, largest=False).indices  # b rows without replacement, ∝ D² (zero D² last)
        d2 = torch.minimum(d2, min_d2(x, sq, x[new], budget))
        d2[new] = 0
        chosen.append(new)
        count += b
    return torch.cat(chosen)


@torch.no_grad()
def lloyd(x: Tensor, centres: Tensor, iters: int, metric: str = "l2", budget: int = BUDGET) -> Tensor:
    """`centres` [k, d] after `iters` Lloyd steps on x; empty clusters keep their previous centre."""
    k = centres.shape[0]
    for _ in range(iters):
        idx = assign(x, centres, metric, budget)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if metric == "cosine":
            centres = F.normalize(centres, dim=1)
    return centres


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 10, metric: str = "l2",
           generator: torch.Generator | None = None, budget: int = BUDGET) -> Tensor:
    """[k, d] centres of x: `seed`, then `iters` Lloyd steps (cosine: on unit rows, unit centres)."""
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    return lloyd(x, x[seed(x, k, generator, budget)].clone(), iters, metric, budget)
