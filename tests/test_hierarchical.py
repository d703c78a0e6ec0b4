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


def test_recovery_counts_children_apart_from_parent_child_composites():
    """The true dictionary scores 1 everywhere but composites; parent + child sums tilted past cos 0.9 to the
    child count as children by cosine alone, not strictly, and as composites; atoms at p + 3c (the edge of
    the cone parent + child rows fill, nearer to c than to p + c) count as children, not as composites."""
    h = Hierarchical(HierarchicalConfig(d=32, n_parents=4, n_children=3))
    assert h.recovery(h.truth) == {"parents": 1.0, "children": 1.0, "children_strict": 1.0, "composites": 0.0}
    tilted = torch.nn.functional.normalize(h.composites + 0.12 * h.children, dim=1)
    assert (tilted @ h.children.t()).diagonal().min() > 0.9  # by cosine alone, each is its child's atom
    rec = h.recovery(torch.cat([h.parents, tilted]))
    assert rec == {"parents": 1.0, "children": 1.0, "children_strict": 0.0, "composites": 1.0}
    edge = torch.nn.functional.normalize(h.parents[h.parent_of] + 3 * h.children, dim=1)
    rec = h.recovery(torch.cat([h.parents, edge]))
    assert rec == {"parents": 1.0, "children": 1.0, "children_strict": 1.0, "composites": 0.0}
