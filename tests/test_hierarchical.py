import torch

from sparsecode.data.hierarchical import Hierarchical, HierarchicalConfig
from sparsecode.data.source import SourceConfig, open_source


def test_children_are_conditionally_orthogonal_and_fire_only_with_their_parent():
    cfg = HierarchicalConfig(d=32, n_parents=8, n_children=3, child_cos=0.6)
    h = Hierarchical(cfg)
    kids = h.children.view(8, 3, 32)
    for p in range(8):
        parent = h.parents[p]
        torch.testing.assert_close(kids[p] @ parent, torch.full((3,), 0.6))
        rest = kids[p] - (kids[p] @ parent)[:, None] * parent
        gram = rest @ rest.t()
        torch.testing.assert_close(gram, 0.64 * torch.eye(3), atol=1e-5, rtol=0)
    x, coef = h.sample(4096)
    parent_on = coef[:, :8] > 0
    child_on = coef[:, 8:].view(-1, 8, 3) > 0
    assert (child_on.sum(2) <= 1).all()
    assert (child_on.any(2) <= parent_on).all()
    torch.testing.assert_close(x, coef @ h.truth)


def test_registered_source_resumes_exactly():
    src = open_source(SourceConfig(kind="hierarchical", options={"d": 16, "n_parents": 4, "n_children": 2}))
    src.next_batch(10)
    state = src.state_dict()
    a = src.next_batch(5)
    src.load_state_dict(state)
    assert torch.equal(a, src.next_batch(5))
