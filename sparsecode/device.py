"""Which device a run or a model uses."""

from __future__ import annotations

import torch

from .errors import SparsecodeError


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu` or `cuda[:N]`; asking for a missing GPU is one error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SparsecodeError(f"device {name!r} asked for, but no CUDA GPU is available")
    return torch.device(name)
