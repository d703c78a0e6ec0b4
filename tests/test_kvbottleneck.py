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
                          clusters(d=32, n_clusters=64), steps=50, lr=10.0)  # SGD: lr scales FVU's gradient
    assert result["fvu"] < 0.2, result
    assert not trained.keys.requires_grad and trained.values.requires_grad


def train_logging_fetches(tmp_path, monkeypatch, steps: int = 12):
    """Train through the real trainer, recording before every step the values and the keys the step fetched."""
    from sparsecode.train import TrainConfig, train
    from sparsecode.vq.kvbottleneck import KVBottleneck

    log = []
    forward = KVBottleneck.forward

    def recording(self, x):
        before = self.values.detach().clone()
        out = forward(self, x)
        log.append((before, torch.zeros(self.cfg.m, dtype=torch.bool).index_fill_(0, out.code.indices.flatten(), True)))
        return out

    monkeypatch.setattr(KVBottleneck, "forward", recording)
    cfg = TrainConfig(method="kvbottleneck", coder={"m": 8 * 32, "heads": 8, "head_dim": 8, "kmeans_iters": 3},
                      source=clusters(d=32, n_clusters=64), steps=steps, batch_size=16, lr=1.0, warmup_steps=0,
                      init_rows=4096, log_every=steps, ckpt_every=steps)
    kv = train(cfg, tmp_path / "run")
    return kv, log


def unfetched_and_unmoved(log, final):
    """Over all steps: values that changed in a step that did not fetch them, and fetched values that stayed."""
    after = [before for before, _ in log[1:]] + [final.detach()]
    stray = still = 0
    for (before, fetched), now in zip(log, after, strict=True):
        changed = (before != now).any(1)
        stray += int((changed & ~fetched).sum())
        still += int((~changed & fetched).sum())
    return stray, still


def test_each_trainer_step_changes_exactly_the_values_it_fetched(tmp_path, monkeypatch):
    """The trainer takes plain SGD steps (make_optimizer): a value changes in a step iff the step fetched it,
    bit for bit, and values never fetched keep their k-means start."""
    kv, log = train_logging_fetches(tmp_path, monkeypatch)
    assert isinstance(kv.make_optimizer([kv.values], 1.0, (0.9, 0.999), None), torch.optim.SGD)
    assert unfetched_and_unmoved(log, kv.values) == (0, 0)
    never = ~torch.stack([fetched for _, fetched in log]).any(0)
    assert 0 < int(never.sum()) < kv.cfg.m
    assert torch.equal(kv.values.detach()[never], log[0][0][never])


def test_the_fetch_check_fails_under_adam(tmp_path, monkeypatch):
    """The same run with Adam (the base Coder's optimizer): its moments move values in steps after their
    last fetch, which the check above counts."""
    from sparsecode.coder import Coder
    from sparsecode.vq.kvbottleneck import KVBottleneck

    monkeypatch.setattr(KVBottleneck, "make_optimizer", Coder.make_optimizer)
    kv, log = train_logging_fetches(tmp_path, monkeypatch)
    stray, still = unfetched_and_unmoved(log, kv.values)
    assert stray > 0 and still == 0, (stray, still)
