"""Checkpoints: safetensors + JSON, written atomically, checked by sha256 when read back.

A run directory holds `config.json`, `metrics.jsonl` and `checkpoints/step-NNNNNNN/`, each checkpoint
self-contained (`config.json` of the method, `model.safetensors`, `state.safetensors` + `state.json`
for the optimizer, schedule, RNG and data position). `checkpoints/LATEST` names the newest complete one.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .coder import Coder, build
from .errors import SparsecodeError
from .files import atomic_write, atomic_write_json, failpoint, make_temp, read_json, sha256, verify_files

MODEL, STATE, STATE_JSON, CONFIG = "model.safetensors", "state.safetensors", "state.json", "config.json"


# --- nested state <-> (tensors, JSON) ------------------------------------------------------------
def pack(obj: Any, tensors: dict[str, Tensor], path: str = "") -> Any:
    """Move every tensor of a nested state into `tensors`; dict keys keep their type (ints stay ints)."""
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def unpack(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: unpack(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


# --- checkpoints --------------------------------------------------------------------------------
def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(run: Path, step: int, coder: Coder, state: dict[str, Any], keep: int = 2) -> Path:
    """Write a complete checkpoint folder under a temp name, rename it, then point LATEST at it."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run, step)
    tmp = make_temp(root, final.name, directory=True)
    try:
        model = {k: v.detach().cpu().contiguous() for k, v in coder.state_dict().items()}
        _save_tensors(model, tmp / MODEL, metadata={"method": coder.name, "step": str(step)})
        tensors: dict[str, Tensor] = {}
        skeleton = pack(state, tensors)
        _save_tensors(tensors, tmp / STATE)
        atomic_write_json(tmp / CONFIG, {"method": coder.name, "coder": coder.config_dict()})
        files = {name: sha256(tmp / name) for name in (MODEL, STATE, CONFIG)}
        atomic_write_json(tmp / STATE_JSON, {"step": step, "sha256": files, "state": skeleton})
        failpoint("checkpoint-written")
        if final.exists():  # a resumed run reached this step again: replace the old copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(root / "LATEST", final.name.encode())
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:
        full = "No space left on device" in str(e)
        raise OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC) if full else str(e),
                      str(path)) from None


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None if it has none yet."""
    run = Path(run)
    if not run.is_dir():
        raise SparsecodeError(f"run directory not found: {run}")
    latest = run / "checkpoints" / "LATEST"
    if not latest.is_file():
        return None
    path = run / "checkpoints" / latest.read_text().strip()
    if not path.is_dir():
        raise SparsecodeError(f"{latest} names {path.name}, which is missing")
    return path


def resolve(path: Path) -> Path:
    """A checkpoint folder from a run folder (its latest checkpoint) or a checkpoint folder."""
    path = Path(path)
    if (path / MODEL).is_file() or (path / STATE_JSON).is_file():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise SparsecodeError(f"{path} holds no checkpoint yet")
    return ckpt


def verify(ckpt: Path) -> dict[str, Any]:
    """Read state.json and check every file's sha256; a mismatch names the corrupt file."""
    meta = read_json(ckpt / STATE_JSON)
    if not isinstance(meta, dict) or "sha256" not in meta:
        raise SparsecodeError(f"corrupt checkpoint metadata: {ckpt / STATE_JSON}")
    verify_files(ckpt, meta["sha256"], "checkpoint file")
    return meta


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise SparsecodeError(f"cannot read {path}: {e}") from None


def load_coder(path: Path, device: str | torch.device = "cpu") -> Coder:
    """Load a trained method from a run folder or a checkpoint folder."""
    ckpt = resolve(path)
    verify(ckpt)
    cfg = read_json(ckpt / CONFIG)
    coder = build(cfg["method"], cfg["coder"])
    load_weights(coder, ckpt)
    return coder.to(device).eval()


def load_weights(coder: Coder, ckpt: Path) -> None:
    """Load a checkpoint's weights into a built method (same method and sizes)."""
    try:
        coder.load_state_dict(_load_tensors(ckpt / MODEL))
    except RuntimeError as e:
        raise SparsecodeError(f"{ckpt / MODEL} does not fit method {coder.name!r}: "
                              f"{str(e).splitlines()[0]}") from None


def load_state(ckpt: Path) -> tuple[int, dict[str, Any]]:
    """(step, nested trainer state) of a verified checkpoint."""
    meta = verify(ckpt)
    return int(meta["step"]), unpack(meta["state"], _load_tensors(ckpt / STATE))
