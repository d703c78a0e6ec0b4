"""A coder as another library stores it: the method it maps to, its tensors under our names, where it came from,
and the format's own forward on its files (the reference every conversion is checked against)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..coder import Coder, build
from ..errors import SparsecodeError
from ..files import read_json

# (dense activations [B, m], reconstruction [B, d]) of rows [B, d], as the file's own library computes them
Reference = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class Foreign:
    """One coder read from another library's files."""

    method: str  # the sparsecode method that computes the same encode/decode
    options: dict[str, Any]  # its config (d_in, m, k, ...)
    state: dict[str, Tensor]  # the tensors that define it, under sparsecode's names
    reference: Reference  # the format's forward on the file's own tensors
    origin: dict[str, Any] = field(default_factory=dict)  # format, architecture, path, model, hook, ...


def build_coder(f: Foreign) -> Coder:
    """The sparsecode method holding the foreign tensors (fp32, eval mode); a tensor it lacks is refused."""
    coder = build(f.method, f.options)
    own = coder.state_dict()
    missing = [name for name, _ in coder.named_parameters() if name not in f.state]
    if missing:
        raise SparsecodeError(f"{f.origin.get('path', 'the file')}: no tensor for {', '.join(missing)} of "
                              f"{f.method}")
    for name, t in f.state.items():
        if name not in own or own[name].shape != t.shape:
            raise SparsecodeError(f"{f.origin.get('path', 'the file')}: {name} of shape {list(t.shape)} does "
                                  f"not fit {f.method} (expected {list(own[name].shape) if name in own else 'none'})")
        own[name] = t.to(own[name].dtype)
    coder.load_state_dict(own)
    return coder.eval()


# --- reading files, each problem in one line ------------------------------------------------------------
def read_config(path: Path) -> dict[str, Any]:
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise SparsecodeError(f"{path}: expected a JSON object")
    return cfg


def read_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file as fp32 tensors; a missing, truncated or corrupt file is one line."""
    if not path.is_file():
        raise SparsecodeError(f"{path} not found")
    try:
        return {k: v.float() for k, v in load_file(path).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise SparsecodeError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def read_torch(path: Path) -> dict[str, Tensor]:
    """A torch.save'd state dict, loaded with weights_only (no pickled code runs)."""
    if not path.is_file():
        raise SparsecodeError(f"{path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad file)
        raise SparsecodeError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SparsecodeError(f"{path}: expected a state dict of tensors")
    return state


def need(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], where: Path) -> Tensor:
    """tensors[name] as fp32 with exactly `shape`; absent, transposed or mis-sized is one line."""
    if name not in tensors:
        raise SparsecodeError(f"{where}: no tensor {name!r} (it holds {', '.join(sorted(tensors)) or 'none'})")
    t = tensors[name]
    if tuple(t.shape) != shape:
        hint = " (transposed?)" if tuple(t.shape) == shape[::-1] and len(shape) == 2 else ""
        raise SparsecodeError(f"{where}: {name} has shape {list(t.shape)}, the config says {list(shape)}{hint}")
    if not torch.isfinite(t).all():
        raise SparsecodeError(f"{where}: {name} holds NaN or infinite values")
    return t.float().contiguous()


def size(cfg: dict[str, Any], key: str, where: Path) -> int:
    """cfg[key], a positive int, or one line naming it."""
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SparsecodeError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def flag(cfg: dict[str, Any], key: str, default: bool, where: Path) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise SparsecodeError(f"{where}: {key} must be true or false, got {value!r}")
    return value


# --- the SAE algebra the three libraries share, on a file's own tensors --------------------------------
def sae_reference(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, center: bool,
                  k: int | None = None, threshold: Tensor | None = None, W_skip: Tensor | None = None) -> Reference:
    """z = rule(relu((x − b_dec?) · W_enc + b_enc)), x̂ = z · W_dec + b_dec, with W_enc [d, m] and W_dec [m, d]:
    every latent (ReLU), the k largest of each row (TopK), or those above `threshold` (JumpReLU, BatchTopK).
    A transcoder: W_dec [m, d_out], b_dec [d_out], center off, and a skip path x · W_skipᵀ (W_skip [d_out, d])."""

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        pre = ((x - b_dec) if center else x) @ W_enc + b_enc
        z = pre.relu()
        if k is not None:
            top = z.topk(k, dim=1)
            z = torch.zeros_like(z).scatter_(1, top.indices, top.values)
        if threshold is not None:
            z = z * (pre > threshold)
        out = z @ W_dec + b_dec
        return z, out if W_skip is None else out + x @ W_skip.T

    return forward


def mp_reference(W_dec: Tensor, b_dec: Tensor, steps: int) -> Reference:
    """Matching pursuit as SAELens runs it with no early stop: `steps` rounds of the atom with the largest
    positive ⟨r, d⟩, its weight added (an atom picked twice sums), r ← r − a·d."""

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        r, z = x - b_dec, x.new_zeros(x.shape[0], W_dec.shape[0])
        for _ in range(steps):
            best = (r @ W_dec.T).relu().max(1).indices
            a = (r * W_dec[best]).sum(1).relu()
            z[torch.arange(x.shape[0]), best] += a
            r = r - a[:, None] * W_dec[best]
        return z, z @ W_dec + b_dec

    return forward
