"""Safe files: one locked writer per folder, atomic writes that follow the umask, torn logs, failpoints."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sparsecode.errors import SparsecodeError
from sparsecode.files import FolderLock, atomic_write, make_temp, read_jsonl, sweep_temps, writing


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_second_writer_gets_one_line_naming_the_holder(tmp_path):
    first = FolderLock(tmp_path, "run").acquire()
    try:
        with pytest.raises(SparsecodeError, match=rf"run {tmp_path} is being written by another process "
                                                  rf"\(pid {os.getpid()}\)"):
            FolderLock(tmp_path, "run").acquire()
    finally:
        first.release()
    FolderLock(tmp_path, "run").acquire().release()  # free again once the holder lets go


def test_a_killed_holder_releases_the_lock(tmp_path):
    """flock dies with its process: a writer killed with SIGKILL does not strand the folder."""
    code = (f"import os, signal; from sparsecode.files import FolderLock; FolderLock({str(tmp_path)!r}, 'run')"
            f".acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    FolderLock(tmp_path, "run").acquire().release()


def test_a_folder_this_call_created_goes_when_nothing_is_kept(tmp_path):
    with pytest.raises(RuntimeError), writing(tmp_path / "new", "run", keep=lambda: False) as created:
        assert created and (tmp_path / "new" / ".lock").is_file()
        raise RuntimeError
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError), writing(tmp_path / "old", "run", keep=lambda: False) as created:
        assert not created
        raise RuntimeError
    assert (tmp_path / "old").is_dir()  # it was there before: left as it was


def test_a_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    for target in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(SparsecodeError, match="exists and is not a folder"), writing(target, "run"):
            pass
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    before = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", b"{}")
        folder = make_temp(tmp_path, "ckpt", directory=True)
    finally:
        os.umask(before)
    assert mode(tmp_path / "a.json") == file_mode and mode(folder) == dir_mode


def test_sweep_removes_only_temp_files(tmp_path):
    make_temp(tmp_path, "config.json")
    make_temp(tmp_path, "step-0000010", directory=True)
    (tmp_path / "keep.json").write_text("{}")
    assert sweep_temps(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_a_torn_last_log_line_is_dropped_a_torn_middle_line_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 10}\n{"step": 20}\n{"st')
    assert read_jsonl(log) == [{"step": 10}, {"step": 20}]
    log.write_text('{"step": 10}\n{"st\n{"step": 30}\n')
    with pytest.raises(SparsecodeError, match="corrupt line 2"):
        read_jsonl(log)
