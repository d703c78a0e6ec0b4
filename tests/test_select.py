"""Each selection rule of sparsecode/sae/select.py on small hand-made tensors, against its definition."""

import math

import torch

from sparsecode.sae import select

PRE = torch.tensor([[3.0, -5.0, 1.0, 2.0, -0.5],
                    [-1.0, -2.0, -3.0, 0.5, -4.0]])


def kept(code) -> list[dict[int, float]]:
    """Each row's active latents as {index: value}."""
    return [{int(i): float(v) for i, v in zip(ri, rv, strict=True) if i >= 0 and v != 0}
            for ri, rv in zip(code.indices, code.values, strict=True)]


def test_topk_keeps_the_k_largest_then_relu():
    code = select.topk(PRE, 2, 5)
    assert code.size == 5 and code.k == 2
    # row 1's second largest is -1: picked, then zeroed by ReLU (an inactive slot)
    assert kept(code) == [{0: 3.0, 3: 2.0}, {3: 0.5}]


def test_abstopk_keeps_the_k_largest_magnitudes_with_their_sign():
    code = select.abstopk(PRE, 2, 5)
    assert kept(code) == [{1: -5.0, 0: 3.0}, {4: -4.0, 2: -3.0}]


def test_batchtopk_keeps_the_k_times_b_largest_relu_values_of_the_batch():
    code = select.batchtopk(PRE, 2, 5)  # 4 slots over the batch: 3, 2, 1 in row 0 and 0.5 in row 1
    assert kept(code) == [{0: 3.0, 3: 2.0, 2: 1.0}, {3: 0.5}]
    code = select.batchtopk(PRE, 1, 5)  # 2 slots: both fall on row 0, row 1 keeps none
    assert kept(code) == [{0: 3.0, 3: 2.0}, {}]


def test_threshold_keeps_every_value_above_theta_scalar_or_per_latent():
    assert kept(select.threshold(PRE, 1.5, 5)) == [{0: 3.0, 3: 2.0}, {}]
    theta = torch.tensor([4.0, 0.0, 0.0, 0.0, -5.0])  # per latent (JumpReLU)
    assert kept(select.threshold(PRE, theta, 5)) == [{2: 1.0, 3: 2.0, 4: -0.5}, {3: 0.5, 4: -4.0}]


def test_topafa_keeps_the_prefix_whose_norm_is_closest_to_the_target():
    pre = torch.tensor([[3.0, 0.0, 4.0, 0.5, -1.0, 0.25]] * 3)
    code = select.topafa(pre, torch.tensor([5.0, 9.0, 4.2]), 6, 6)  # prefix norms: 4, 5, 5.025, 5.031
    assert kept(code) == [{2: 4.0, 0: 3.0}, {2: 4.0, 0: 3.0, 3: 0.5, 5: 0.25}, {2: 4.0}]
    assert code.indices[0, 2:].eq(-1).all()  # dropped slots are empty
    code = select.topafa(pre[:1], torch.tensor([0.0]), 6, 6)  # at least one latent
    assert kept(code) == [{2: 4.0}]


def test_values_keep_their_gradient_to_pre():
    pre = PRE.clone().requires_grad_()
    select.abstopk(pre, 2, 5).values.sum().backward()
    assert pre.grad.tolist() == [[1.0, 1.0, 0, 0, 0], [0, 0, 1.0, 0, 1.0]]


def test_auxk_rules_hide_live_latents():
    dead = torch.tensor([False, True, True, False, True])
    for rule, expected in ((select.RELU_TOPK, [{2: 1.0}, {}]), (select.ABS_TOPK, [{1: -5.0}, {4: -4.0}])):
        code = rule.pick(PRE.masked_fill(~dead, rule.hide), 1, 5)
        assert kept(code) == expected
        assert dead[code.indices].all()  # never a live latent
    assert select.RELU_TOPK.hide == -math.inf and select.ABS_TOPK.hide == 0.0
    assert select.ROW_RULES == {"topk": select.RELU_TOPK, "abstopk": select.ABS_TOPK, "batchtopk": select.RELU_TOPK}
