"""Nearest-code and top-k search: exact against brute force, and memory-bounded at K = 262,144, d = 256."""

import torch
import torch.nn.functional as F

from sparsecode.vq import search
from sparsecode.vq.search import blocks, most_similar, nearest


def test_most_similar_equals_brute_force_within_budget():
    x, codes = torch.randn(50, 8), torch.randn(700, 8)
    sim = F.normalize(x, dim=1) @ F.normalize(codes, dim=1).t()
    ref = sim.topk(5, dim=1).indices
    for budget in (1, 64, 999, 1 << 24):
        got = most_similar(x, codes, 5, budget)
        assert torch.equal(sim.gather(1, got), sim.gather(1, ref)), budget


def test_blocks_stay_within_budget():
    for n, k, budget in [(8, 262144, 1 << 20), (4096, 16384, 1 << 24), (3, 5, 1), (100, 7, 50)]:
        rows, cols = blocks(n, k, budget)
        assert rows * cols <= max(budget, 1) and rows >= 1 and cols >= 1


def test_search_at_262k_codes_keeps_every_distance_block_within_budget(monkeypatch):
    """K = 262,144 codes of d = 256 (1 GiB as a [B, K] matrix at B = 1024): with a budget of 2²⁰ elements
    (4 MiB of float32) no distance block is larger, and the answer equals a per-row brute force."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(262144, 256, generator=g)
    x = codes[torch.tensor([5, 100000, 262143])] + 0.01 * torch.randn(3, 256, generator=g)
    x = torch.cat([x, torch.randn(5, 256, generator=g)])
    largest = []
    real_addmm = torch.addmm

    def spy(bias, a, b, **kw):
        out = real_addmm(bias, a, b, **kw)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(search.torch, "addmm", spy)
    budget = 1 << 20
    got = nearest(x, codes, budget=budget)
    assert largest and max(largest) <= budget
    assert got[:3].tolist() == [5, 100000, 262143]
    for i in range(3, 8):  # brute force one row at a time: [K] distances, no [B, K] matrix
        assert got[i] == (codes - x[i]).pow(2).sum(1).argmin()
