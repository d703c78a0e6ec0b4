"""Safe files: atomic writes that follow the umask, sha256 checks, one locked writer per folder.

A run folder or a store is written by one process at a time: `writing(folder)` holds an exclusive
`flock` on `folder/.lock` (the OS drops it when the writer dies, even by kill -9) and, if the folder was
created by this call and nothing worth keeping was written when an error stops it, removes it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SparsecodeError

LOCK = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp(folder: Path, name: str, directory: bool = False) -> Path:
    """A new temp file (or folder) `.{name}.*.tmp` in `folder`, with the permissions the umask allows."""
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.", suffix=".tmp"))
        os.chmod(tmp, 0o777 & ~_umask())
        return tmp
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(tmp)


def sweep_temps(folder: Path) -> int:
    """Remove the `.*.tmp` files and folders a killed writer left in `folder`; returns how many."""
    folder = Path(folder)
    stale = list(folder.glob(".*.tmp")) if folder.is_dir() else []
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return len(stale)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and a rename."""
    path = Path(path)
    tmp = make_temp(path.parent, path.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        failpoint(f"before-rename:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SparsecodeError(f"missing file: {path}") from None
    except IsADirectoryError:
        raise SparsecodeError(f"{path} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SparsecodeError(f"corrupt JSON in {path}: {e}") from None


def read_jsonl(path: Path) -> list[Any]:
    """The records of a JSON-lines log; a torn last line (its writer killed mid-write) is left out."""
    try:
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise SparsecodeError(f"missing file: {path}") from None
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise SparsecodeError(f"corrupt line {i + 1} in {path}") from None
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(root: Path, digests: dict[str, str], what: str) -> None:
    """Check each file under `root` against its sha256; a missing or corrupt one is named in the error."""
    for name, digest in digests.items():
        f = Path(root) / name
        if not f.is_file():
            raise SparsecodeError(f"{what} missing: {f}")
        if sha256(f) != digest:
            raise SparsecodeError(f"{what} is corrupt or truncated (sha256 mismatch): {f}")


# --- one writer per folder ----------------------------------------------------------------------
class FolderLock:
    """An exclusive, non-blocking flock on `folder/.lock`; a second writer gets one clear error."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what, self.fd = Path(folder), what, -1

    def acquire(self) -> FolderLock:
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SparsecodeError(f"{self.what} {self.folder} is being written by another process (pid {holder}); "
                                  f"wait for it to finish or pick another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock; the file stays (removing it would race a new writer)
            self.fd = -1


def check_folder(folder: Path, what: str) -> None:
    """A folder to write into must not be a file (or under one)."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            raise SparsecodeError(f"{what} {folder}: {p} exists and is not a folder")


@contextmanager
def writing(folder: Path, what: str, keep: Callable[[], bool] = lambda: True) -> Iterator[bool]:
    """Create `folder` if needed and lock it for this writer; yields whether this call created it.

    On an exception, a folder this call created is removed again unless `keep()` says it holds something
    worth resuming from; a folder that existed before is left as it was.
    """
    folder = Path(folder)
    check_folder(folder, what)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    failpoint("folder-created")
    lock = FolderLock(folder, what)
    try:
        lock.acquire()
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield created
    except BaseException:
        if created and not keep():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        lock.release()


def only_lock_left(folder: Path, also: set[str] | frozenset[str] = frozenset()) -> bool:
    """True when a folder holds nothing but its lock file and temp files (a writer died before writing), and the
    entries named in `also`."""
    folder = Path(folder)
    return folder.is_dir() and all(p.name == LOCK or p.name.endswith(".tmp") or p.name in also
                                   for p in folder.iterdir())


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL at `name` when SPARSECODE_FAILPOINT says so (kill -9 tests); under torchrun
    only rank SPARSECODE_FAILPOINT_RANK, if set."""
    only = os.environ.get("SPARSECODE_FAILPOINT_RANK")
    if os.environ.get("SPARSECODE_FAILPOINT") == name and only in (None, os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
