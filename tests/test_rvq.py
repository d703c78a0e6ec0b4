"""Residual VQ: later stages code what earlier ones left, so FVU falls with stages; per-stage usage."""

import torch
from vq_helpers import clusters, run

from sparsecode.coder import build


def test_stage_indices_and_decode():
    rvq = build("rvq", {"d_in": 4, "m": 3 * 8, "stages": 3}).eval()
    x = torch.randn(16, 4)
    code = rvq.encode(x)
    assert code.k == 3 and code.indices.shape == (16, 3)
    assert (rvq.code_ids(code) < 8).all() and (rvq.code_ids(code) >= 0).all()
    assert torch.equal(code.indices // 8, torch.arange(3).expand(16, 3))
    r = x.clone()
    for s, q in enumerate(rvq.quantizers):  # each stage is the nearest code to the running residual
        j = torch.cdist(r, q.codebook).argmin(1)
        assert torch.equal(j, code.indices[:, s] - 8 * s)
        r = r - q.codebook[j]


def test_more_stages_explain_more_variance():
    source = clusters(d=32, n_clusters=256, spread=0.3)
    _, one = run("rvq", {"m": 64, "stages": 1}, source, steps=60)
    _, three = run("rvq", {"m": 3 * 64, "stages": 3}, source, steps=60)
    assert three["fvu"] < 0.8 * one["fvu"], (one, three)
    assert three["utilisation"] > 0.9, three  # per-stage usage: m counts every stage's codes
