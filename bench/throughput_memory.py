"""Transient memory of one training step (bench/throughput.py): the GPU allocator's peak, or on the CPU
the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) above its RSS before the step, after
glibc `malloc_trim(0)` so that heap memory the step reuses counts too."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand free heap pages back to the OS (glibc), so memory the step reuses from the heap counts in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_peak_bytes(step: Callable[[Tensor], Any], x: Tensor, dev: torch.device) -> int | None:
    """Transient memory of one step above what was in use before it (see the module docstring)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step(x)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    if not _can_reset_hwm():  # not Linux: no per-step peak RSS
        return None
    _malloc_trim()
    base = _status_kb("VmRSS")
    step(x)
    return max(0, _status_kb("VmHWM") - base) * 1024
