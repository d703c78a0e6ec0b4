import pytest
import torch
from conftest import topk_config

from sparsecode.checkpoint import latest_checkpoint, load_coder, pack, unpack
from sparsecode.errors import SparsecodeError
from sparsecode.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "run"
    train(topk_config(steps=20, ckpt_every=10, coder={"m": 64, "k": 4}), path)
    return path


def test_pack_roundtrip_keeps_int_keys_and_tensors():
    state = {"a": {0: torch.arange(3), 1: {"x": 1.5, "t": (torch.ones(2), "s")}}, "n": None}
    tensors = {}
    skeleton = pack(state, tensors)
    back = unpack(skeleton, tensors)
    assert list(back["a"].keys()) == [0, 1]
    assert torch.equal(back["a"][0], torch.arange(3))
    assert back["a"][1]["x"] == 1.5 and back["n"] is None
    assert torch.equal(back["a"][1]["t"][0], torch.ones(2))


def test_only_the_newest_checkpoints_are_kept(run):
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["LATEST", "step-0000010", "step-0000020"]
    assert latest_checkpoint(run).name == "step-0000020"


def test_checkpoint_folder_explains_itself(run):
    coder = load_coder(run / "checkpoints" / "step-0000010")
    assert coder.name == "topk" and coder.cfg.m == 64


def copy_run(run, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_truncated_checkpoint_is_named(run, tmp_path):
    dst = copy_run(run, tmp_path)
    f = latest_checkpoint(dst) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(SparsecodeError, match="corrupt or truncated.*model.safetensors"):
        load_coder(dst)


def test_corrupted_checkpoint_is_named(run, tmp_path):
    dst = copy_run(run, tmp_path)
    f = latest_checkpoint(dst) / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SparsecodeError, match="corrupt or truncated.*state.safetensors"):
        train(topk_config(steps=20, ckpt_every=10, coder={"m": 64, "k": 4}), dst, resume=True)
    (latest_checkpoint(dst) / "state.json").write_text("{not json")
    with pytest.raises(SparsecodeError, match="corrupt JSON"):
        load_coder(dst)


def test_missing_run_dir(tmp_path):
    with pytest.raises(SparsecodeError, match="run directory not found"):
        load_coder(tmp_path / "nope")
