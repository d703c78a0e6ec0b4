"""EleutherAI sparsify's on-disk sparse coder: `<out>/<hookpoint>/cfg.json` + `sae.safetensors` (encoder.weight
[m, d], encoder.bias [m], W_dec [m, d], b_dec [d]). It holds TopK SAEs only (x − b_dec encoded, ReLU, top k);
its transcoders, skip connections and groupmax activation have no sparsecode method yet and are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..coder import Coder
from ..errors import SparsecodeError
from ..files import atomic_write_json
from .foreign import Foreign, flag, need, read_config, read_tensors, sae_reference, size

NAME = "sparsify"
CFG, WEIGHTS = "cfg.json", "sae.safetensors"
HOLDS = ("topk",)


def found(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def hookpoint(about: dict[str, Any]) -> str:
    """The subfolder sparsify names after the hookpoint (the store's hook, else `layer`)."""
    return str(about.get("hook") or "layer").replace("/", ".")


def write(coder: Coder, about: dict[str, Any], folder: Path) -> None:
    c = coder.cfg
    if not getattr(c, "center_input", True):
        raise SparsecodeError("sparsify encodes x − b_dec; this SAE reads x uncentred (center_input=false)")
    out = folder / hookpoint(about)
    out.mkdir()
    save_file({"encoder.weight": coder.W_enc.detach().float().contiguous(),
               "encoder.bias": coder.b_enc.detach().float().contiguous(),
               "W_dec": coder.W_dec.detach().float().contiguous(),
               "b_dec": coder.b_dec.detach().float().contiguous()}, out / WEIGHTS)
    atomic_write_json(out / CFG, {"activation": "topk", "expansion_factor": max(1, c.m // c.d_in),
                                  "normalize_decoder": True, "num_latents": c.m, "k": c.k, "multi_topk": False,
                                  "skip_connection": False, "transcode": False, "d_in": c.d_in})


def read(folder: Path) -> Foreign:
    where = folder / CFG
    cfg = read_config(where)
    if cfg.get("activation", "topk") != "topk":
        raise SparsecodeError(f"{where}: activation {cfg['activation']!r} has no sparsecode method (only topk)")
    for key in ("transcode", "skip_connection"):
        if flag(cfg, key, False, where):
            raise SparsecodeError(f"{where}: {key}=true (a transcoder or skip path) is not supported yet")
    d, k = size(cfg, "d_in", where), size(cfg, "k", where)
    m = cfg.get("num_latents") or d * size(cfg, "expansion_factor", where)
    if not isinstance(m, int) or m <= 0:
        raise SparsecodeError(f"{where}: num_latents must be a positive integer, got {m!r}")
    tensors, wpath = read_tensors(folder / WEIGHTS), folder / WEIGHTS
    W_enc, b_enc = need(tensors, "encoder.weight", (m, d), wpath), need(tensors, "encoder.bias", (m,), wpath)
    W_dec, b_dec = need(tensors, "W_dec", (m, d), wpath), need(tensors, "b_dec", (d,), wpath)
    if k > m:
        raise SparsecodeError(f"{where}: k={k} exceeds num_latents={m}")
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return Foreign("topk", {"d_in": d, "m": m, "k": k}, state,
                   sae_reference(W_enc.T, b_enc, W_dec, b_dec, True, k=k),
                   {"format": NAME, "architecture": "topk", "path": str(folder), "hook": folder.name})
