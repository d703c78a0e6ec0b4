"""The fault battery: kill -9 at each point of train and harvest, a second writer, a full disk, a read-only
folder, and bad files; each ends in one clear line (exit 2) or a clean resume, never a stranded folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import gpt2_dir, write_corpus  # noqa: F401
from safetensors.torch import load_file

from sparsecode.checkpoint import latest_checkpoint, load_coder
from sparsecode.cli import main
from sparsecode.data.store import Store
from sparsecode.files import FolderLock

TRAIN = ["train", "-m", "64", "-k", "4", "--source-opt", "d=16", "--steps", "60", "--batch-size", "128",
         "--ckpt-every", "20", "--log-every", "20", "--no-progress"]


def sc(*args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    """`python -m sparsecode ARGS` in a fresh process (killed with SIGKILL at `failpoint`, if given)."""
    env = {**os.environ, **({"SPARSECODE_FAILPOINT": failpoint} if failpoint else {})}
    return subprocess.run([sys.executable, "-m", "sparsecode", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


def one_line(err: str, *words: str) -> None:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.tmp")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults") / "straight"
    assert sc(*TRAIN, "--out", str(run)).returncode == 0
    return run


# --- kill -9 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["folder-created", "before-rename:config.json", "config-written",
                                   "checkpoint-written", "before-rename:LATEST"])
def test_train_killed_at_each_point_resumes_to_the_straight_run(straight, tmp_path, point):
    run = tmp_path / "run"
    assert sc(*TRAIN, "--out", str(run), failpoint=point).returncode == -9
    assert run.is_dir()
    done = sc(*TRAIN, "--out", str(run), "--resume")
    assert done.returncode == 0, done.stderr
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not leftovers(run)


def test_a_run_killed_before_its_first_checkpoint_also_restarts_without_resume(straight, tmp_path):
    run = tmp_path / "run"
    assert sc(*TRAIN, "--out", str(run), failpoint="config-written").returncode == -9
    assert sc(*TRAIN, "--out", str(run)).returncode == 0
    assert all(torch.equal(weights(straight)[k], v) for k, v in weights(run).items())


def test_extending_a_run_survives_a_kill(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *TRAIN, "--out", str(run), "--steps", "20")[0] == 0
    killed = sc(*TRAIN, "--out", str(run), "--resume", "--steps", "60", failpoint="checkpoint-written")
    assert killed.returncode == -9  # killed writing step 40, the first checkpoint after the extension
    assert latest_checkpoint(run).name == "step-0000020"
    assert cli(capsys, "train", "--out", str(run), "--resume", "--no-progress")[0] == 0  # no --steps this time
    assert latest_checkpoint(run).name == "step-0000060"
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [20, 40, 60]
    assert not leftovers(run)  # the half-written step-40 folder was swept when the run resumed


HARVEST = ["harvest", "--hook", "transformer.h.0", "--tokens", "300", "--context", "16", "--shard-tokens", "100",
           "--batch-contexts", "4", "--device", "cpu", "--no-progress"]


def store_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != ".lock"}


@pytest.fixture(scope="module")
def harvest_args(gpt2_dir, tmp_path_factory) -> list[str]:  # noqa: F811
    corpus = write_corpus(tmp_path_factory.mktemp("faults") / "c", docs=20)
    return [*HARVEST, "--model", str(gpt2_dir), "--corpus", str(corpus)]


@pytest.fixture(scope="module")
def straight_store(harvest_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "straight"
    assert sc(*harvest_args, "--out", str(out)).returncode == 0
    return out


@pytest.mark.parametrize("point", ["folder-created", "before-rename:manifest.json", "shard-written"])
def test_harvest_killed_at_each_point_finishes_to_the_straight_store(harvest_args, straight_store, tmp_path, point):
    assert sc(*harvest_args, "--out", str(tmp_path / "s"), failpoint=point).returncode == -9
    again = sc(*harvest_args, "--out", str(tmp_path / "s"))
    assert again.returncode == 0, again.stderr
    assert store_files(straight_store) == store_files(tmp_path / "s")


# --- a second writer -----------------------------------------------------------------------------
def test_a_second_writer_of_a_run_or_store_is_refused(harvest_args, tmp_path, capsys):
    for args in ([*TRAIN, "--out", str(tmp_path / "run")], [*harvest_args, "--out", str(tmp_path / "s")]):
        folder = Path(args[-1])
        folder.mkdir()
        lock = FolderLock(folder, "held").acquire()
        try:
            code, err = cli(capsys, *args)
        finally:
            lock.release()
        assert code == 2
        one_line(err, "is being written by another process", f"pid {os.getpid()}")
        assert [p.name for p in folder.iterdir()] == [".lock"]  # the holder's folder is left alone


def test_two_runs_started_together_leave_one_consistent_run(tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "sparsecode", *TRAIN, "--out", str(run)]
    procs = [subprocess.Popen(base + ["-m", str(m)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for m in (64, 96)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    one_line(loser, str(run))
    assert "being written by another process" in loser or "already exists" in loser
    m = json.loads((run / "config.json").read_text())["coder"]["m"]
    assert load_coder(run).cfg.m == m and weights(run)["W_dec"].shape[0] == m  # config and weights agree


# --- a full disk, a read-only folder -------------------------------------------------------------
@contextmanager
def tmpfs(path: Path, size: str, *options: str):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_while_training_keeps_the_last_checkpoint(tmp_path, capsys):
    """About one checkpoint of m=1024, d=64 fits: the second fails with one line; the first stays loadable."""
    with tmpfs(tmp_path / "disk", "1700k") as disk:
        code, err = cli(capsys, "train", "-m", "1024", "-k", "4", "--source-opt", "d=64", "--steps", "4",
                        "--ckpt-every", "1", "--batch-size", "64", "--no-progress", "--out", str(disk / "run"))
        assert code == 2
        one_line(err, "No space left on device")
        assert latest_checkpoint(disk / "run").name == "step-0000001"
        assert load_coder(disk / "run").cfg.m == 1024 and not leftovers(disk / "run")


def test_a_full_disk_before_any_checkpoint_leaves_nothing(tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "200k") as disk:
        code, err = cli(capsys, "train", "-m", "1024", "-k", "4", "--source-opt", "d=64", "--steps", "2",
                        "--batch-size", "64", "--no-progress", "--out", str(disk / "run"))
        assert code == 2
        one_line(err, "No space left on device")
        assert not (disk / "run").exists()


def test_a_full_disk_while_harvesting_leaves_an_incomplete_store_that_resumes(harvest_args, tmp_path, capsys):
    args = [*harvest_args, "--tokens", "600", "--dtype", "fp32"]
    assert cli(capsys, *args, "--out", str(tmp_path / "straight"))[0] == 0
    with tmpfs(tmp_path / "disk", "40k") as disk:  # a shard of 100 rows at d=32 in fp32 is about 14 kB
        code, err = cli(capsys, *args, "--out", str(disk / "s"))
        assert code == 2
        one_line(err, "No space left on device")
        manifest = json.loads((disk / "s" / "manifest.json").read_text())
        assert not manifest["complete"] and 0 < manifest["tokens"] < 600
        with pytest.raises(Exception, match="incomplete"):
            Store(disk / "s")  # never mistaken for a complete store
        shutil.copytree(disk / "s", tmp_path / "moved")
    assert cli(capsys, *args, "--out", str(tmp_path / "moved"))[0] == 0
    assert store_files(tmp_path / "straight") == store_files(tmp_path / "moved")


def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        code, err = cli(capsys, *TRAIN, "--out", str(ro / "run"))
    assert code == 2
    one_line(err, "Read-only file system", str(ro / "run"))


# --- bad files and flags -------------------------------------------------------------------------
def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    code, err = cli(capsys, *TRAIN, "--out", str(tmp_path / "f"))
    assert code == 2
    one_line(err, "exists and is not a folder")
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("config, words", [
    ('"just a string"', ["must be a JSON object"]),
    (None, ["option 'steps' must be int, got 'many'"]),
    ("[1, 2", ["corrupt JSON"]),
])
def test_a_config_of_the_wrong_type_is_one_line(tmp_path, capsys, config, words):
    run = tmp_path / "run"
    assert cli(capsys, *TRAIN, "--out", str(run), "--steps", "20")[0] == 0
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(config if config is not None else json.dumps({**saved, "steps": "many"}))
    for args in (["train", "--out", str(run), "--resume"], ["eval", str(run)], ["info", str(run)]):
        code, err = cli(capsys, *args)
        assert code == 2
        one_line(err, "config.json", *words)


def test_a_torn_last_log_line_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *TRAIN, "--out", str(run), "--steps", "40")[0] == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4')  # a kill in the middle of a log write
    assert cli(capsys, "train", "--out", str(run), "--resume", "--steps", "60", "--no-progress")[0] == 0
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [20, 40, 60]


@pytest.mark.parametrize("flag", [["--method", "vq"], ["-m", "32"], ["-k", "3"], ["--lr", "0.01"],
                                  ["--source", "clusters"], ["--source-opt", "d=8"], ["--seed", "1"],
                                  ["--set", "aux_coef=0.5"], ["--batch-size", "64"]])
def test_resume_refuses_a_contradicting_flag_by_name(tmp_path, capsys, flag):
    run = tmp_path / "run"
    assert cli(capsys, *TRAIN, "--out", str(run), "--steps", "20")[0] == 0
    before = (run / "config.json").read_bytes()
    code, err = cli(capsys, "train", "--out", str(run), "--resume", "--steps", "40", *flag)
    assert code == 2
    one_line(err, "contradict the run's config")
    name = {"--method": "method", "-m": "coder.m", "-k": "coder.k", "--lr": "lr", "--source": "source",
            "--source-opt": "source", "--seed": "seed", "--set": "coder.aux_coef", "--batch-size": "batch_size"}
    assert name[flag[0]] in err
    assert (run / "config.json").read_bytes() == before and latest_checkpoint(run).name == "step-0000020"


def test_resume_accepts_flags_that_agree(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *TRAIN, "--out", str(run), "--steps", "20")[0] == 0
    assert cli(capsys, *TRAIN, "--out", str(run), "--resume", "--steps", "40")[0] == 0
    assert latest_checkpoint(run).name == "step-0000040"


def store_with(tmp_path: Path, edit=None) -> Path:
    from test_store import make_store

    path = make_store(tmp_path / "store", n=600, d=4, shard=200)
    if edit is not None:
        edit(path)
    return path


def _tokens(path: Path) -> None:
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**m, "tokens": m["tokens"] + 50}))


def _width(path: Path) -> None:
    m = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**m, "d": 8}))


def _missing(path: Path) -> None:
    (path / "shard-00001.safetensors").unlink()


def _corrupt(path: Path) -> None:
    f = path / "shard-00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("edit, words", [
    (_tokens, ["says 650 tokens but its shards hold 600"]),
    (_width, ["has shape (200, 4), expected (200, 8)"]),
    (_missing, ["store shard file missing", "shard-00001.safetensors"]),
    (_corrupt, ["corrupt or truncated", "shard-00002.safetensors"]),
])
def test_a_bad_store_is_one_line_and_leaves_no_run(tmp_path, capsys, edit, words):
    store = store_with(tmp_path, edit)
    code, err = cli(capsys, "train", "-m", "16", "-k", "2", "--steps", "5", "--batch-size", "64",
                    "--source", str(store), "--no-progress", "--out", str(tmp_path / "run"))
    assert code == 2
    one_line(err, *words)
    assert not (tmp_path / "run").exists()


def test_a_nan_first_batch_leaves_no_run(tmp_path, capsys):
    data = np.ones((512, 8), dtype=np.float32)
    data[:, 3] = np.nan
    np.save(tmp_path / "nan.npy", data)
    code, err = cli(capsys, "train", "-m", "16", "-k", "2", "--steps", "5", "--source", str(tmp_path / "nan.npy"),
                    "--no-progress", "--out", str(tmp_path / "run"))
    assert code == 2
    one_line(err, "NaN or inf")
    assert not (tmp_path / "run").exists()


def test_a_folder_of_other_files_is_refused_and_left_untouched(harvest_args, tmp_path, capsys):
    """--out naming someone's folder: one line, and not even a lock file is added to it."""
    for args, what in (([*TRAIN], "not a sparsecode run"), (harvest_args, "is not a store")):
        mine = tmp_path / what.replace(" ", "_")
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
        code, err = cli(capsys, *args, "--out", str(mine))
        assert code == 2
        one_line(err, what)
        assert [p.name for p in mine.iterdir()] == ["notes.txt"]
