import pytest
import torch

from sparsecode.code import Code, decode


def random_code(b=5, k=3, m=11):
    idx = torch.randint(0, m, (b, k))
    return Code(idx, torch.randn(b, k), m)


def test_decode_matches_dense_product_and_gradients():
    atoms = torch.randn(11, 4, requires_grad=True)
    code = random_code()
    values = code.values.clone().requires_grad_(True)
    code = Code(code.indices, values, 11)
    out = decode(code, atoms, bias=torch.ones(4))
    dense = code.to_dense() @ atoms + 1
    torch.testing.assert_close(out, dense)
    g = torch.randn_like(out)
    ga, gv = torch.autograd.grad(out, (atoms, values), g)
    ga_ref, gv_ref = torch.autograd.grad(dense, (atoms, values), g)
    torch.testing.assert_close(ga, ga_ref)
    torch.testing.assert_close(gv, gv_ref)


def test_unused_slots_are_ignored():
    atoms = torch.randn(6, 3)
    code = Code(torch.tensor([[2, -1], [-1, -1]]), torch.tensor([[2.0, 5.0], [7.0, 1.0]]), 6)
    out = decode(code, atoms)
    torch.testing.assert_close(out[0], 2 * atoms[2])
    torch.testing.assert_close(out[1], torch.zeros(3))
    assert code.l0().tolist() == [1, 0]
    assert code.counts().tolist() == [0, 0, 1, 0, 0, 0]


def test_active_excludes_zero_values():
    code = Code(torch.tensor([[0, 1, 2]]), torch.tensor([[1.0, 0.0, 3.0]]), 4)
    assert code.l0().item() == 2
    assert code.counts().tolist() == [1, 0, 1, 0]


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="one \\[B, k\\] shape"):
        Code(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2), 5)
