"""The fused Triton nearest-code search agrees with the chunked PyTorch reference: on CPU through Triton's
interpreter (a subprocess, since TRITON_INTERPRET must be set before Triton is imported), on a GPU natively."""

import json
import os
import subprocess
import sys

import pytest
import torch

from sparsecode.vq.search import nearest, nearest_chunked

CHECK = """
import json, torch
from sparsecode.kernels.nearest import nearest_fused, triton
from sparsecode.vq.search import nearest, nearest_chunked
g = torch.Generator().manual_seed(0)
out = {}
for n, k, d in [(130, 300, 40), (5, 1, 3), (64, 129, 33), (200, 1000, 8)]:
    x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    out[f"{n},{k},{d}"] = torch.equal(nearest_fused(x, c), nearest_chunked(x, c, 97))
x, c = torch.randn(50, 16, generator=g), torch.randn(70, 16, generator=g)
cos = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(c, dim=1).t()).argmax(1)
out["cosine through nearest()"] = torch.equal(nearest(x, c, "cosine"), cos)
out["triton"] = triton is not None
print(json.dumps(out))
"""


def test_fused_search_matches_reference_in_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(result.values()), result


def test_without_the_interpreter_cpu_tensors_take_the_reference_path():
    x, c = torch.randn(40, 8), torch.randn(100, 8)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert torch.equal(nearest(x, c), nearest_chunked(x, c))


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
