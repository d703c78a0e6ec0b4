"""EleutherAI sparsify's on-disk sparse coder: `<out>/<hookpoint>/cfg.json` + `sae.safetensors` (encoder.weight
[m, d], encoder.bias [m], W_dec [m, d], b_dec [d]). It holds TopK SAEs only (x − b_dec encoded, ReLU, top k),
and TopK transcoders of the input's width (`transcode`: x itself encoded; `skip_connection`: plus x · W_skipᵀ,
W_skip [d, d]); an autoencoder with a skip path and the groupmax activation have no sparsecode method."""

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
TRANSCODES = ("topk",)  # of d_out = d_in only: sparsify's decoder writes the input's width


def found(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def hookpoint(about: dict[str, Any]) -> str:
    """The subfolder sparsify names after the hookpoint (the store's hook, else `layer`)."""
    return str(about.get("hook") or "layer").replace("/", ".")


def write(coder: Coder, about: dict[str, Any], folder: Path) -> None:
    c = coder.cfg
    if c.d_out and c.d_out != c.d_in:
        raise SparsecodeError(f"sparsify's transcoders decode to their input's width (d_in={c.d_in}); this one "
                              f"has d_out={c.d_out}")
    if not c.d_out and not getattr(c, "center_input", True):
        raise SparsecodeError("sparsify encodes x − b_dec; this SAE reads x uncentred (center_input=false)")
    out = folder / hookpoint(about)
    out.mkdir()
    t = {"encoder.weight": coder.W_enc, "encoder.bias": coder.b_enc, "W_dec": coder.W_dec, "b_dec": coder.b_dec,
         **({"W_skip": coder.W_skip} if c.skip else {})}
    save_file({k: v.detach().float().contiguous() for k, v in t.items()}, out / WEIGHTS)
    atomic_write_json(out / CFG, {"activation": "topk", "expansion_factor": max(1, c.m // c.d_in),
                                  "normalize_decoder": True, "num_latents": c.m, "k": c.k, "multi_topk": False,
                                  "skip_connection": c.skip, "transcode": bool(c.d_out), "d_in": c.d_in})


def read(folder: Path) -> Foreign:
    where = folder / CFG
    cfg = read_config(where)
    if cfg.get("activation", "topk") != "topk":
        raise SparsecodeError(f"{where}: activation {cfg['activation']!r} has no sparsecode method (only topk)")
    transcode, skip = flag(cfg, "transcode", False, where), flag(cfg, "skip_connection", False, where)
    if skip and not transcode:
        raise SparsecodeError(f"{where}: skip_connection=true with transcode=false (an autoencoder with a skip "
                              f"path) has no sparsecode method")
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
    options: dict[str, Any] = {"d_in": d, "m": m, "k": k}
    W_skip = need(tensors, "W_skip", (d, d), wpath) if skip else None
    if transcode:  # x itself encoded, decoded to the same width
        options.update(d_out=d, skip=skip)
        state.update({"W_skip": W_skip} if skip else {})
    return Foreign("topk", options, state, sae_reference(W_enc.T, b_enc, W_dec, b_dec, not transcode, k=k,
                                                         W_skip=W_skip),
                   {"format": NAME, "architecture": "transcoder" if transcode else "topk", "path": str(folder),
                    "hook": folder.name})
