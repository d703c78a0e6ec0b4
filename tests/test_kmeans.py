import torch

from sparsecode.vq.kmeans import kmeans, min_d2, seed


def objective(x, centres):
    """Mean squared distance of each row to its nearest centre."""
    return torch.cdist(x, centres).min(1).values.pow(2).mean().item()


def unbalanced_clusters(seed_: int = 0):
    """16 far-apart clusters in d = 8: one holds 2,700 rows, the other 15 hold 20 rows each."""
    g = torch.Generator().manual_seed(seed_)
    centres = 10 * torch.randn(16, 8, generator=g)
    sizes = torch.tensor([2700] + [20] * 15)
    x = centres.repeat_interleave(sizes, 0) + torch.randn(int(sizes.sum()), 8, generator=g)
    return x, centres


def test_seeding_covers_small_clusters_that_a_uniform_draw_misses():
    """D² seeding at K = 16 finds nearly every cluster (mean over 5 draws): a fraction of a random sample's cost."""
    x, _ = unbalanced_clusters()
    ours, uniform = [], []
    for s in range(5):
        g = torch.Generator().manual_seed(s)
        ours.append(objective(x, x[seed(x, 16, g)]))
        uniform.append(objective(x, x[torch.randperm(x.shape[0], generator=g)[:16]]))
    ours, uniform = sum(ours) / 5, sum(uniform) / 5
    assert ours < 0.3 * uniform, (ours, uniform)
    assert ours < 30, ours  # a cluster found costs ~2·8 per row; each one missed adds ~10 to the mean


def test_seeding_is_deterministic_from_its_generator():
    x, _ = unbalanced_clusters()
    torch.manual_seed(1)
    a = seed(x, 100, torch.Generator().manual_seed(3))
    torch.manual_seed(2)  # the global generator plays no part
    b = seed(x, 100, torch.Generator().manual_seed(3))
    c = seed(x, 100, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.unique().numel() == 100  # distinct rows
    ka = kmeans(x, 100, iters=3, generator=torch.Generator().manual_seed(3))
    kb = kmeans(x, 100, iters=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ka, kb)


def test_duplicate_rows_are_drawn_last():
    """10 distinct rows, each 3 times: 12 seeds hold all 10 values (a row at distance 0 only when none is left)."""
    x = torch.randn(10, 4).repeat(3, 1)
    idx = seed(x, 12, torch.Generator().manual_seed(0))
    assert idx.unique().numel() == 12
    assert torch.unique(x[idx], dim=0).shape[0] == 10


def test_more_centres_than_rows_takes_every_row_then_repeats():
    x = torch.randn(7, 3)
    centres = kmeans(x, 10, iters=2, generator=torch.Generator().manual_seed(0))
    assert centres.shape == (10, 3)
    assert torch.cdist(x, centres).min(1).values.max() < 1e-6  # every row is a centre
    assert torch.unique(centres, dim=0).shape[0] == 7
    assert seed(x, 7, torch.Generator().manual_seed(0)).sort().values.tolist() == list(range(7))


def test_min_d2_matches_brute_force_in_any_blocks():
    x, c = torch.randn(50, 6), torch.randn(23, 6)
    ref = torch.cdist(x, c).min(1).values.pow(2)
    for budget in (1, 7, 100, 1 << 20):
        torch.testing.assert_close(min_d2(x, x.pow(2).sum(1), c, budget), ref, atol=1e-4, rtol=1e-4)
