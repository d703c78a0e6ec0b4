"""Which device a run or a model uses."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import SparsecodeError


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu` or `cuda[:N]`; asking for a missing GPU is one error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SparsecodeError(f"device {name!r} asked for, but no CUDA GPU is available")
    return torch.device(name)


@contextmanager
def deterministic_kernels(on: bool) -> Iterator[None]:
    """Deterministic algorithms (and cuBLAS workspace) while training, restored afterwards."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable matmuls
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
