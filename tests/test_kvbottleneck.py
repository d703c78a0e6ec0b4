"""Discrete key–value bottleneck: forgets less than a fine-tuned linear head on a class-incremental stream."""

import torch
import torch.nn.functional as F
from vq_helpers import clusters, run

from sparsecode.coder import build


def class_stream(classes: int = 8, d: int = 16, width: int = 64, seed: int = 0):
    """Classes made of 3 Gaussian blobs each, seen through a frozen random ReLU encoder."""
    g = torch.Generator().manual_seed(seed)
    blobs = torch.randn(classes, 3, d, generator=g) * 2
    enc_w, enc_b = torch.randn(d, width, generator=g) / d**0.5, torch.randn(width, generator=g) * 0.1

    def sample(label: int, n: int) -> torch.Tensor:
        centre = blobs[label, torch.randint(3, (n,), generator=g)]
        return F.relu((centre + 0.5 * torch.randn(n, d, generator=g)) @ enc_w + enc_b)

    return sample


def test_kv_bottleneck_forgets_less_than_a_linear_head():
    classes, width = 8, 64
    sample = class_stream(classes, width=width)
    unlabelled = torch.cat([sample(c, 500) for c in range(classes)])
    kv = build("kvbottleneck", {"d_in": width, "m": 8 * 64, "heads": 8, "head_dim": 8, "d_value": classes,
                                  "kmeans_iters": 3})
    kv.generator = torch.Generator().manual_seed(0)
    kv.init_from_data(unlabelled)
    head = torch.nn.Linear(width, classes)
    opt_kv = torch.optim.SGD([kv.values], lr=1.0)  # no momentum: unfetched values stay still
    opt_head = torch.optim.SGD(head.parameters(), lr=0.1)
    for label in range(classes):  # one class after another, no task boundary
        for _ in range(15):
            x, y = sample(label, 32), torch.full((32,), label)
            for opt, logits in ((opt_kv, kv.logits(x)), (opt_head, head(x))):
                opt.zero_grad()
                F.cross_entropy(logits, y).backward()
                opt.step()
    test_x = torch.cat([sample(c, 200) for c in range(classes)])
    test_y = torch.arange(classes).repeat_interleave(200)
    with torch.no_grad():
        acc_kv = (kv.logits(test_x).argmax(1) == test_y).float().mean().item()
        acc_head = (head(test_x).argmax(1) == test_y).float().mean().item()
        old = test_y < classes - 1
        old_kv = (kv.logits(test_x[old]).argmax(1) == test_y[old]).float().mean().item()
        old_head = (head(test_x[old]).argmax(1) == test_y[old]).float().mean().item()
    assert acc_kv > 0.8 and acc_kv > acc_head + 0.3, (acc_kv, acc_head)
    assert old_kv > old_head + 0.3, (old_kv, old_head)  # what was learned first is what the head forgets


def test_reconstruction_values_train_and_reload():
    """With values in input space the trainer fits them; keys are frozen; codes reload identically."""
    trained, result = run("kvbottleneck", {"m": 8 * 32, "heads": 8, "head_dim": 8, "kmeans_iters": 5},
                          clusters(d=32, n_clusters=64), steps=50, lr=1e-2)
    assert result["fvu"] < 0.2, result
    assert not trained.keys.requires_grad and trained.values.requires_grad
