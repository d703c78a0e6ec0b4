"""k-means for codebook initialisation: k-means++ seeding for small K, a random sample for large K."""

from __future__ import annotations

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


PLUSPLUS_MAX_K = 4096  # k-means++ costs K passes over the sample; above this, seed from a random sample


@torch.no_grad()
def seed_plusplus(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ (D² sampling) seeds: [k] row indices of x."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    chosen = [first]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        p = d2.double().cpu()
        i = torch.multinomial(p / p.sum(), 1, generator=generator).item() if p.sum() > 0 else \
            torch.randint(n, (1,), generator=generator).item()
        chosen.append(i)
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(1))
    return torch.tensor(chosen, device=x.device)


def sample_rows(n: int, k: int, generator: torch.Generator | None = None) -> Tensor:
    """[k] indices of distinct rows out of n (all n, then repeats, when k > n), on the CPU."""
    idx = torch.randperm(n, generator=generator)[:k]
    if n < k:
        idx = torch.cat([idx, torch.randint(n, (k - n,), generator=generator)])
    return idx


@torch.no_grad()
def kmeans(x: Tensor, k: int, iters: int = 10, metric: str = "l2",
           generator: torch.Generator | None = None, budget: int = BUDGET) -> Tensor:
    """[k, d] centres of x after `iters` Lloyd steps; empty clusters keep their previous centre."""
    n = x.shape[0]
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    # k-means++ seeds for small k; else a random sample (too few points: all of them, then repeats)
    idx = seed_plusplus(x, k, generator) if k <= PLUSPLUS_MAX_K and n > k else sample_rows(n, k, generator).to(x.device)
    centres = x[idx].clone()
    for _ in range(iters):
        assign = nearest(x, centres, metric, budget)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if metric == "cosine":
            centres = F.normalize(centres, dim=1)
    return centres
