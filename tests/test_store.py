"""Store reader: epochs see every row once, seeds change the order, resume continues it; errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecode.data.source import SourceConfig, open_source
from sparsecode.data.store import Store, StoreOptions, StoreSource, StoreWriter
from sparsecode.errors import SparsecodeError


def make_store(path: Path, n: int = 1000, d: int = 4, shard: int = 170, dtype: str = "fp32",
               fmt: str = "safetensors") -> Path:
    """A store whose row i is [i, i, ...] (fp32 holds these integers exactly)."""
    header = {"model": "test", "dtype": dtype, "file_format": fmt, "tokens_requested": n}
    w = StoreWriter(path, header, shard)
    for start in range(0, n, 64):
        i = torch.arange(start, min(n, start + 64))
        w.add({"acts": i[:, None].float().expand(-1, d), "tokens": i % 7, "doc": i // 50, "pos": i % 50},
              {"cursor": [0, 0], "row": start})
    w.finish()
    return path


def ids(x: torch.Tensor) -> list[int]:
    return x[:, 0].long().tolist()


def source(path: Path, seed: int = 0, split: str = "train", heldout: float = 0.0, **opts) -> StoreSource:
    opts = {"chunk_rows": 32, "buffer_rows": 128, **opts}
    return open_source(SourceConfig(kind="store", path=str(path), seed=seed, heldout=heldout, options=opts), split)


def test_two_epochs_each_row_once(tmp_path):
    src = source(make_store(tmp_path / "s"))
    assert src.d == 4
    first = ids(src.next_batch(999)) + ids(src.next_batch(1))
    second = ids(src.next_batch(1000))
    assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))
    assert first != second and first != sorted(first)
    batch = ids(src.next_batch(100))  # one batch mixes several chunks from several shards
    assert len({i // 32 for i in batch}) > 3 and len({i // 170 for i in batch}) > 1


def test_seeds_and_resume(tmp_path):
    path = make_store(tmp_path / "s")
    a, b, c = source(path, 1), source(path, 1), source(path, 2)
    run_a = [ids(a.next_batch(300)) for _ in range(5)]
    assert run_a == [ids(b.next_batch(300)) for _ in range(5)]
    assert run_a[0] != ids(c.next_batch(300))
    a2 = source(path, 1)
    for _ in range(2):
        a2.next_batch(300)
    state = json.loads(json.dumps(a2.state_dict()))
    resumed = source(path, 1)
    resumed.load_state_dict(state)
    assert [ids(resumed.next_batch(300)) for _ in range(3)] == run_a[2:]


def test_heldout_split_is_disjoint(tmp_path):
    path = make_store(tmp_path / "s")
    train = set(ids(source(path, heldout=0.1).next_batch(900)))
    held = ids(source(path, split="eval", heldout=0.1).next_batch(100))
    assert sorted(held) == list(range(900, 1000)) and train == set(range(900))


@pytest.mark.parametrize("fmt,dtype", [("npy", "bf16"), ("npy", "fp16"), ("safetensors", "bf16")])
def test_formats_and_dtypes_round_trip(tmp_path, fmt, dtype):
    store = Store(make_store(tmp_path / "s", n=300, d=3, dtype=dtype, fmt=fmt))
    idx = torch.tensor([299, 0, 170, 5])
    want = idx[:, None].float().expand(-1, 3).to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]).float()
    assert torch.equal(store.gather(idx), want)
    assert store.gather(idx, "pos").tolist() == [299 % 50, 0, 170 % 50, 5]
    assert isinstance(store.shard(0)["acts"], np.memmap)


def test_corrupt_shard_is_named(tmp_path):
    path = make_store(tmp_path / "s")
    shard = path / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    src = source(path)
    with pytest.raises(SparsecodeError, match="shard-00002.safetensors") as e:
        for _ in range(10):
            src.next_batch(200)
    assert "\n" not in str(e.value)


def test_missing_and_incomplete_manifest(tmp_path):
    path = make_store(tmp_path / "s")
    (path / "manifest.json").unlink()
    with pytest.raises(SparsecodeError, match="manifest.json is missing"):
        source(path)
    with pytest.raises(SparsecodeError, match="not found"):
        source(tmp_path / "nowhere")
    w = StoreWriter(tmp_path / "p", {"model": "t", "dtype": "fp16", "file_format": "npy", "tokens_requested": 9}, 4)
    w.add({"acts": torch.ones(5, 2), "tokens": torch.zeros(5), "doc": torch.zeros(5), "pos": torch.zeros(5)},
          {"cursor": [0, 0], "row": 0})
    with pytest.raises(SparsecodeError, match="incomplete"):
        source(tmp_path / "p")
    with pytest.raises(SparsecodeError, match="not a store"):
        StoreWriter(path, {"model": "t", "dtype": "fp16", "file_format": "npy"}, 4)


def test_options_are_checked(tmp_path):
    path = make_store(tmp_path / "s")
    with pytest.raises(SparsecodeError, match="buffer_rows"):
        source(path, buffer_rows=4)
    with pytest.raises(SparsecodeError, match="chunk_row"):
        source(path, chunk_row=4)
    assert StoreOptions().buffer_rows >= StoreOptions().chunk_rows


def test_store_plugs_into_the_trainer(tmp_path):
    from sparsecode.train import TrainConfig, train

    path = make_store(tmp_path / "s", n=2000, d=8)
    src = SourceConfig(kind="store", path=str(path), options={"chunk_rows": 64})
    with pytest.raises(SparsecodeError, match="d=8") as e:
        train(TrainConfig(method="topk", coder={"d_in": 16, "m": 32, "k": 2}, source=src, steps=2), tmp_path / "r")
    assert "\n" not in str(e.value)
    cfg = TrainConfig(method="topk", coder={"m": 32, "k": 2}, source=src, steps=6, batch_size=64,
                      ckpt_every=3, init_rows=128)
    straight = train(cfg, tmp_path / "a")
    stopped = TrainConfig.from_dict({**json.loads((tmp_path / "a" / "config.json").read_text()), "steps": 3})
    train(stopped, tmp_path / "b")
    resumed = train(cfg, tmp_path / "b", resume=True)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_labelled_batch_uses_next_tokens_within_documents(tmp_path):
    path = make_store(tmp_path / "s")  # row i: token i % 7, document i // 50, position i % 50
    src = source(path)
    x, labels = src.labelled_batch(500, classes=3)
    rows = ids(x)
    assert len(rows) == len(set(rows)) > 100
    assert all(r % 50 != 49 for r in rows)  # the last token of a document has no next token
    assert labels.tolist() == [(r + 1) % 7 for r in rows]
    assert len(set(labels.tolist())) == 3
