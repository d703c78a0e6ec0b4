import numpy as np
import pytest
import torch

from sparsecode.data.source import SourceConfig, TensorSource, open_source
from sparsecode.errors import SparsecodeError


def test_epochs_visit_every_row_once_and_resume_continues_the_order():
    data = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, 3)
    src = TensorSource(data, seed=3)
    rows = torch.cat([src.next_batch(30) for _ in range(10)])[:, 0].long()  # 3 epochs
    for e in range(3):
        assert sorted(rows[100 * e : 100 * e + 100].tolist()) == list(range(100))
    assert rows[:100].tolist() != rows[100:200].tolist()  # each epoch reshuffles
    src2 = TensorSource(data, seed=3)
    src2.next_batch(130)
    state = src2.state_dict()
    src3 = TensorSource(data, seed=3)
    src3.load_state_dict(state)
    assert torch.equal(src3.next_batch(50)[:, 0].long(), rows[130:180])
    assert TensorSource(data, seed=4).next_batch(100)[:, 0].tolist() != rows[:100].tolist()


def test_npy_source_splits_heldout_rows(tmp_path):
    arr = np.arange(200 * 4, dtype=np.float16).reshape(200, 4)
    np.save(tmp_path / "a.npy", arr)
    cfg = SourceConfig(kind="npy", path=str(tmp_path / "a.npy"), heldout=0.1)
    train, test = open_source(cfg, "train"), open_source(cfg, "eval")
    assert train.d == 4 and open_source(cfg, "train").next_batch(5).dtype == torch.float32
    seen = set(train.next_batch(180)[:, 0].long().tolist())
    held = set(test.next_batch(20)[:, 0].long().tolist())
    assert len(seen) == 180 and len(held) == 20 and not seen & held


def test_npy_errors_are_one_line(tmp_path):
    with pytest.raises(SparsecodeError, match="activation file not found"):
        open_source(SourceConfig(kind="npy", path=str(tmp_path / "missing.npy")))
    np.save(tmp_path / "ints.npy", np.zeros((4, 4), dtype=np.int32))
    with pytest.raises(SparsecodeError, match="expected a float array"):
        open_source(SourceConfig(kind="npy", path=str(tmp_path / "ints.npy")))
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    with pytest.raises(SparsecodeError, match="cannot read .* as a .npy array"):
        open_source(SourceConfig(kind="npy", path=str(tmp_path / "junk.npy")))
    with pytest.raises(SparsecodeError, match="unknown source kind 'synthtic' \\(did you mean 'synthetic'\\?\\)"):
        open_source(SourceConfig(kind="synthtic"))


def test_evaluation_reads_a_finite_split_once():
    from sparsecode.coder import build
    from sparsecode.evaluate import evaluate

    src = TensorSource(torch.randn(300, 8))
    assert len(src) == 300
    assert evaluate(build("topk", {"d_in": 8, "m": 16, "k": 2}), src, rows=10_000, details=False)["rows"] == 300
