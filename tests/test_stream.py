"""On-the-fly source: same rows as a harvest, mixed across documents, resumable exactly."""

from __future__ import annotations

import json

import pytest
import torch
from data_helpers import gpt2_dir, write_corpus  # noqa: F401

from sparsecode.data.harvest import HarvestConfig, harvest
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.data.store import Store
from sparsecode.errors import SparsecodeError


def stream(gpt2_dir, corpus, seed=0, split="train", heldout=0.0, **opts):  # noqa: F811
    options = {"model": str(gpt2_dir), "hook": "transformer.h.1", "corpus": str(corpus), "context": 16,
               "batch_contexts": 4, "buffer_rows": 120, "device": "cpu", **opts}
    return open_source(SourceConfig(kind="model", options=options, seed=seed, heldout=heldout), split)


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    return x[x[:, 0].argsort()]


def test_one_epoch_is_the_harvest_mixed(gpt2_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    m = harvest(HarvestConfig(out=str(tmp_path / "s"), model=str(gpt2_dir), hook="transformer.h.1",
                              corpus=str(corpus), tokens=10**6, context=16, dtype="fp32", batch_contexts=4))
    store = Store(tmp_path / "s")
    stored = store.gather(torch.arange(store.n))
    src = stream(gpt2_dir, corpus, buffer_rows=300)
    assert src.d == 32
    epoch = src.next_batch(m["tokens"])
    torch.testing.assert_close(sort_rows(epoch), sort_rows(stored), rtol=1e-6, atol=1e-6)
    # rows of one batch come from many documents, in no stored order
    where = torch.cdist(epoch[:60], stored).argmin(1)
    assert len(set(store.gather(where, "doc").tolist())) >= 3 and where.tolist() != sorted(where.tolist())
    second = src.next_batch(m["tokens"])  # the next epoch starts again from the corpus beginning
    torch.testing.assert_close(sort_rows(second), sort_rows(stored), rtol=1e-6, atol=1e-6)


def test_resume_continues_exactly(gpt2_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    a = stream(gpt2_dir, corpus, seed=3)
    straight = [a.next_batch(50) for _ in range(30)]  # crosses windows and the epoch end
    b = stream(gpt2_dir, corpus, seed=3)
    for _ in range(7):
        b.next_batch(50)
    state = json.loads(json.dumps(b.state_dict()))
    c = stream(gpt2_dir, corpus, seed=3)
    c.load_state_dict(state)
    assert all(torch.equal(c.next_batch(50), x) for x in straight[7:])
    other = stream(gpt2_dir, corpus, seed=4).next_batch(50)
    assert not torch.equal(other, straight[0])


def test_eval_split_has_other_documents(gpt2_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c", docs=30)
    train = stream(gpt2_dir, corpus, heldout=0.3)
    held = stream(gpt2_dir, corpus, split="eval", heldout=0.3)
    eval_docs = {i for i in range(30) if held.keep_doc(i)}
    assert 0 < len(eval_docs) < 30 and not any(train.keep_doc(i) for i in eval_docs)
    assert held.next_batch(10).shape == (10, 32)


def test_errors_are_one_line(gpt2_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    with pytest.raises(SparsecodeError, match="closest"):
        stream(gpt2_dir, corpus, hook="transformer.h.5.mlp")
    with pytest.raises(SparsecodeError, match="unknown model source option"):
        stream(gpt2_dir, corpus, layers="x")
    (tmp_path / "e").mkdir()
    with pytest.raises(SparsecodeError, match="empty"):
        stream(gpt2_dir, tmp_path / "e")
    held = stream(gpt2_dir, write_corpus(tmp_path / "one", docs=1), split="eval", heldout=0.01)
    with pytest.raises(SparsecodeError, match="no text for this split") as e:
        held.next_batch(4)
    assert "\n" not in str(e.value)


def test_one_pass_feeds_a_transcoder_and_a_crosscoder(gpt2_dir, tmp_path):  # noqa: F811
    """With `target` the rows are [the hook's, the target's] and with `hooks` the sites side by side, each part the
    rows a stream of that site alone gives; training takes d_out and sites from them."""
    from sparsecode.train import TrainConfig, train

    corpus = write_corpus(tmp_path / "c")
    mlp, out = "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp"
    paired = stream(gpt2_dir, corpus, hook=mlp, hook_point="input", target=out)
    alone_in, alone_out = stream(gpt2_dir, corpus, hook=mlp, hook_point="input"), stream(gpt2_dir, corpus, hook=out)
    assert (paired.d, paired.d_out) == (32, 32)
    rows = paired.next_batch(90)
    assert torch.equal(rows[:, :32], alone_in.next_batch(90)) and torch.equal(rows[:, 32:], alone_out.next_batch(90))
    sites = stream(gpt2_dir, corpus, hooks=["transformer.h.0", "transformer.h.1"])
    assert sites.site_widths == (32, 32) and sites.d == 64
    both = sites.next_batch(90)
    assert torch.equal(both[:, 32:], stream(gpt2_dir, corpus).next_batch(90))  # transformer.h.1 alone
    opts = {"model": str(gpt2_dir), "corpus": str(corpus), "context": 16, "batch_contexts": 4, "buffer_rows": 120,
            "device": "cpu"}
    for name, extra in (("tc", {"hook": mlp, "hook_point": "input", "target": out}),
                        ("cc", {"hooks": ["transformer.h.0", "transformer.h.1"]})):
        cfg = TrainConfig(method="topk", coder={"m": 32, "k": 4}, steps=4, batch_size=32, init_rows=64, device="cpu",
                          source=SourceConfig(kind="model", options={**opts, **extra}, heldout=0.2))
        coder = train(cfg, tmp_path / name)
        assert (coder.cfg.d_out, coder.cfg.sites) == ((32, 1) if name == "tc" else (0, 2))
    with pytest.raises(SparsecodeError, match="do not go together"):
        stream(gpt2_dir, corpus, hooks=["transformer.h.0", "transformer.h.1"], target=out)
