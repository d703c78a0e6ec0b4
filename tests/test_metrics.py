import math

import torch

from sparsecode.code import Code
from sparsecode.metrics import CodeStats, fvu, perplexity, recovery


def test_fvu_hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): variance sum 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert fvu(x, x_hat).item() == 0.5


def test_perplexity_hand_computed():
    assert math.isclose(perplexity(torch.tensor([5.0, 5.0, 5.0, 5.0])), 4.0)
    assert math.isclose(perplexity(torch.tensor([10.0, 0.0, 0.0])), 1.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert math.isclose(perplexity(p * 4), math.exp(-(p * p.log()).sum().item()), rel_tol=1e-6)


def test_codestats_l0_utilisation_and_dense():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    code = Code(torch.tensor([[0, 1], [0, -1]]), torch.tensor([[1.0, 2.0], [1.0, 0.0]]), 4)
    s = CodeStats(4)
    s.update(x, x, code)
    r = s.result()
    assert r["fvu"] == 0
    assert r["l0"] == 1.5
    assert r["utilisation"] == 0.5
    assert r["never_fired"] == 0.5
    assert r["dense"] == 0.5  # atoms 0 and 1 fire on > 10% of rows
    assert math.isclose(r["perplexity"], math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))


def test_codestats_fvu_uses_the_global_mean_across_batches():
    x = torch.randn(64, 3)
    x_hat = x + 0.1 * torch.randn(64, 3)
    code = Code(torch.zeros(64, 1, dtype=torch.long), torch.ones(64, 1), 2)
    s = CodeStats(2)
    for part in range(4):
        sl = slice(16 * part, 16 * part + 16)
        s.update(x[sl], x_hat[sl], Code(code.indices[sl], code.values[sl], 2))
    assert math.isclose(s.result()["fvu"], fvu(x.double(), x_hat.double()).item(), rel_tol=1e-9)


def test_recovery_counts_features_above_threshold():
    true = torch.eye(4)
    atoms = torch.stack([torch.tensor([1.0, 0.1, 0, 0]), torch.tensor([0, 1.0, 0, 0]),
                         torch.tensor([0, 0, 1.0, 1.0])])
    r = recovery(atoms, true)
    assert r["recovered"] == 0.5  # features 0 and 1; 2 and 3 only reach cos 0.707
    best = [1 / math.sqrt(1.01), 1.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    assert math.isclose(r["mean_best_cos"], sum(best) / 4, rel_tol=1e-6)


def test_dead_share_hand_computed():
    from sparsecode.coder import build

    sae = build("topk", {"d_in": 2, "m": 4, "k": 1, "dead_tokens": 5})
    sae.track(Code(torch.tensor([[0], [1], [0]]), torch.ones(3, 1), 4))  # atoms 2, 3 idle for 3 tokens
    assert sae.since_fired.tolist() == [0, 0, 3, 3] and sae.dead_mask().float().mean() == 0
    sae.track(Code(torch.tensor([[1], [2]]), torch.tensor([[1.0], [0.0]]), 4))  # atom 2's value is 0: not fired
    assert sae.since_fired.tolist() == [2, 0, 5, 5]
    assert sae.dead_mask().float().mean().item() == 0.5  # atoms 2 and 3 reached dead_tokens=5
