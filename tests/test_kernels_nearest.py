"""The fused Triton nearest-code search agrees with the chunked PyTorch reference: on CPU through Triton's
interpreter (a subprocess, since TRITON_INTERPRET must be set before Triton is imported), on a GPU natively.
Inputs plant each row's nearest code at a known index with a runner-up 1% farther, across code tiles and in the
last partial one, and integer inputs make exact ties, so that a wrong argmin, offset, mask or tie rule shows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsecode.vq.search import nearest


def planted(n: int, k: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [n, d], codes [k, d], expected [p]) for the first p = min(n, k // 2) rows: row i's nearest code sits at
    expected[i] (the last code for row 0), a runner-up only 1% farther at a lower index for half the rows and a
    higher one for the others; every other code is far away."""
    g = torch.Generator().manual_seed(seed)
    x, codes = torch.randn(n, d, generator=g), 4 * torch.randn(k, d, generator=g)
    p = min(n, k // 2)
    low, high = torch.randperm(k - 1, generator=g)[: 2 * p].view(2, p).sort(0).values  # two distinct slots per row
    odd = torch.arange(p) % 2 == 1
    best, runner = torch.where(odd, high, low), torch.where(odd, low, high)
    best[0] = k - 1  # the very last code, in the partial last tile
    unit = torch.nn.functional.normalize(torch.randn(2, p, d, generator=g), dim=2)
    codes[best] = x[:p] + 0.3 * unit[0]
    codes[runner] = x[:p] + 0.303 * unit[1]
    return x, codes, best


def integer_ties(n: int, k: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, codes, expected): small integers, so every distance is exact in fp32 and ties are exact (many rows
    have several nearest codes); expected is the lowest index among each row's nearest."""
    g = torch.Generator().manual_seed(seed)
    x, codes = torch.randint(-1, 2, (n, d), generator=g), torch.randint(-1, 2, (k, d), generator=g)
    dist = (x[:, None, :] - codes[None]).pow(2).sum(2)
    first = torch.where(dist == dist.min(1, keepdim=True).values, torch.arange(k), k).min(1).values
    return x.float(), codes.float(), first


CHECK = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_kernels_nearest import integer_ties, planted
from sparsecode.kernels.nearest import nearest_fused, triton
from sparsecode.vq.search import nearest, nearest_chunked
out = {{"triton": triton is not None}}
# K and d not multiples of the kernel's blocks (128 codes, 32 dims), rows not a multiple of 64
for n, k, d in [(130, 400, 40), (5, 17, 3), (64, 129, 33), (200, 1000, 8)]:
    x, c, best = planted(n, k, d)
    fused, ref = nearest_fused(x, c), nearest_chunked(x, c, 97)
    out[f"{{n}},{{k}},{{d}} fused = reference"] = torch.equal(fused, ref)
    out[f"{{n}},{{k}},{{d}} fused = planted"] = torch.equal(fused[: best.numel()], best)
    x, c, first = integer_ties(n, k, d)
    out[f"{{n}},{{k}},{{d}} exact ties: lowest index"] = torch.equal(nearest_fused(x, c), first)
x, c, best = planted(50, 160, 16)
cos = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(c, dim=1).t()).argmax(1)
out["cosine through nearest()"] = torch.equal(nearest(x, c, "cosine"), cos)
print(json.dumps(out))
"""


def test_fused_search_matches_reference_in_the_triton_interpreter():
    """The kernel (interpreted) finds every planted nearest code and agrees with the chunked search on all rows."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = CHECK.format(tests=str(Path(__file__).parent))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(result.values()), result


def test_cpu_search_is_the_chunked_reference_and_finds_the_planted_codes(monkeypatch):
    """Without the interpreter CPU tensors never reach the kernel; the chunked search, in blocks that cut the
    codebook anywhere, finds every planted code and agrees with a brute-force cdist argmin."""
    import sparsecode.kernels.nearest as kernel

    def no_kernel(*args, **kwargs):
        raise AssertionError("the fused kernel ran on CPU tensors")

    monkeypatch.setattr(kernel, "nearest_fused", no_kernel)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for n, k, d in [(130, 400, 40), (5, 17, 3), (64, 129, 33)]:
        x, c, best = planted(n, k, d)
        brute = torch.cdist(x.double(), c.double(), compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
        assert torch.equal(brute[: best.numel()], best)
        x_int, c_int, first = integer_ties(n, k, d)
        for budget in (97, 1 << 20):
            assert torch.equal(nearest(x, c, budget=budget), brute), (n, k, d, budget)
            assert torch.equal(nearest(x_int, c_int, budget=budget), first), (n, k, d, budget)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_search_matches_reference_on_gpu():
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    x, c = torch.randn(4096, 256, device="cuda", generator=g), torch.randn(65536, 256, device="cuda", generator=g)
    fast, ref = nearest(x, c), nearest(x, c, fused=False)
    # TF32 dots may flip near-ties: the picked codes must be as near as the reference's, within rounding
    d_fast, d_ref = (x - c[fast]).pow(2).sum(1), (x - c[ref]).pow(2).sum(1)
    assert (fast == ref).float().mean() > 0.99
    torch.testing.assert_close(d_fast, d_ref, rtol=2e-3, atol=1e-2)
