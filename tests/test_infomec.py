"""InfoMEC: one-to-one latents score 1 on all three; a rotation of them mixes factors and scores lower."""

import math

import torch

from sparsecode.diagnose.infomec import infomec, mutual_information


def test_mutual_information_of_a_label_with_itself_is_its_entropy():
    a = torch.arange(4).repeat(50)
    assert abs(mutual_information(a, a) - math.log(4)) < 1e-9
    assert abs(mutual_information(a, torch.zeros(200, dtype=torch.long))) < 1e-12


def test_disentangled_latents_score_one_and_mixed_latents_lower():
    g = torch.Generator().manual_seed(0)
    factors = torch.randint(5, (3000, 3), generator=g)
    good = infomec(factors, factors.clone(), discrete=True)
    assert good["infom"] > 0.99 and good["infoc"] > 0.99 and good["infoe"] > 0.99, good
    mixed = factors.double() @ torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    bad = infomec(factors, mixed, discrete=False)
    assert bad["infom"] < good["infom"] - 0.3 and bad["infoc"] < good["infoc"] - 0.3, bad
