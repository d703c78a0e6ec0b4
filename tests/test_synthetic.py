import torch

from sparsecode.data.source import SourceConfig, open_source
from sparsecode.data.synthetic import Clusters, ClustersConfig, SparseFeatures, SparseFeaturesConfig


def test_superposition_set_statistics():
    src = SparseFeatures(SparseFeaturesConfig(d=32, n_features=128, active=4, alpha=1.0), seed=1)
    x, coef = src.sample(20000)
    torch.testing.assert_close(src.features.norm(dim=1), torch.ones(128))
    assert abs((coef > 0).sum(1).float().mean().item() - 4) < 0.1
    freq = (coef > 0).float().mean(0)
    assert freq[0] > 5 * freq[-1]  # power-law: the first features fire far more often
    assert ((coef[coef > 0] >= 0.5) & (coef[coef > 0] <= 1.5)).all()
    torch.testing.assert_close(x, coef @ src.features)


def test_signed_features_take_both_signs():
    src = SparseFeatures(SparseFeaturesConfig(d=16, n_features=32, active=4, signed=True), seed=0)
    _, coef = src.sample(5000)
    assert (coef > 0).sum() > 0.4 * (coef != 0).sum() and (coef < 0).sum() > 0.4 * (coef != 0).sum()


def test_clusters_are_well_separated():
    src = Clusters(ClustersConfig(d=64, n_clusters=256, spread=0.1), seed=0)
    x, labels = src.sample(4000)
    assert ((x - src.centres[labels]).norm(dim=1).mean() - 0.1).abs() < 0.01
    dist = torch.cdist(src.centres, src.centres) + 10 * torch.eye(256)
    assert dist.min() > 0.5  # nearest centres are far apart compared with the spread


def test_eval_split_is_another_stream_of_the_same_truth_and_resumes():
    cfg = SourceConfig(kind="synthetic", options={"d": 16, "n_features": 32})
    train, test = open_source(cfg, "train"), open_source(cfg, "eval")
    assert torch.equal(train.truth, test.truth)
    assert not torch.equal(train.next_batch(8), test.next_batch(8))
    state = train.state_dict()
    a = train.next_batch(8)
    train.load_state_dict(state)
    assert torch.equal(a, train.next_batch(8))


def test_both_polarities_needs_each_pole_carried_by_a_latent_of_its_sign():
    """Feature 0: atoms +f and −f, both firing positive (two ReLU latents); feature 1: one atom firing with
    both signs (a signed latent); feature 2: one atom, positive only; feature 3: one atom, negative in
    fewer than 10% of its firings. Only the first two count."""
    from sparsecode.code import Code
    from sparsecode.data.synthetic import both_polarities

    truth = torch.eye(4, 8)
    atoms = torch.cat([truth, -truth[:1]])  # latent 4 is −f0
    rows = [(0, 1.0), (4, 2.0), (1, 1.0), (1, -1.0), (2, 1.0)] + [(3, 1.0)] * 19 + [(3, -1.0)]
    idx, val = torch.tensor([[i] for i, _ in rows]), torch.tensor([[v] for _, v in rows])
    assert both_polarities(atoms, Code(idx, val, 5), truth) == 0.5
    assert both_polarities(-atoms, Code(idx, val, 5), truth) == 0.5  # the poles swap, the count does not
