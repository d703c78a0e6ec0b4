"""SAELens's on-disk SAE: `cfg.json` + `sae_weights.safetensors` (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc,
b_dec, `threshold` for jumprelu) and, once evaluated, `sparsity.safetensors` (log10 firing density).

topk → "topk"; relu → "standard"; jumprelu → "jumprelu" (threshold = exp(log θ)); batchtopk and matryoshka →
"jumprelu" with their one inference threshold in every slot, as SAELens saves its own BatchTopK; mp →
"matching_pursuit" run for k rounds with no early stop. The method and options go into `metadata`
(sparsecode_method, sparsecode_options), which SAELens keeps, so a BatchTopK comes back as one.

Transcoders (d_out > 0; W_dec [d_sae, d_out], b_dec [d_out], the encoder reads x: apply_b_dec_to_input=false):
relu → "transcoder"; jumprelu, batchtopk and matryoshka → "jumprelu_transcoder" (as above); with a skip path
the "skip_" forms, which add x · W_skipᵀ (W_skip [d_out, d_in]). SAELens has no TopK transcoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..coder import Coder
from ..errors import SparsecodeError
from ..files import atomic_write_json
from .foreign import Foreign, flag, mp_reference, need, read_config, read_tensors, sae_reference, size

NAME = "saelens"
CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
ARCH = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
        "matryoshka": "jumprelu", "mp": "matching_pursuit"}
HOLDS = tuple(ARCH)
TRANSCODER = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder",
              "matryoshka": "jumprelu_transcoder"}
TRANSCODES = tuple(TRANSCODER)
TRANSCODER_ARCHS = {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"}


def architecture(coder: Coder) -> str:
    """The SAELens architecture of a coder: its ARCH entry, or for a transcoder its (skip) TRANSCODER one."""
    c, method = coder.cfg, coder.name
    if not c.d_out:
        return ARCH[method]
    return TRANSCODER[method].replace("transcoder", "skip_transcoder") if c.skip else TRANSCODER[method]


def found(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def write(coder: Coder, about: dict[str, Any], folder: Path) -> None:
    """The coder as SAELens saves one (fp32); `about`: model, hook, context, corpus; `density` [m] if known."""
    c, method = coder.cfg, coder.name
    t = {"W_dec": coder.W_dec, "b_dec": coder.b_dec}
    if method != "mp":
        t.update(W_enc=coder.W_enc.T, b_enc=coder.b_enc)
    if method == "jumprelu":
        t["threshold"] = coder.theta.detach()
    elif method in ("batchtopk", "matryoshka"):
        t["threshold"] = torch.full((c.m,), float(coder.threshold))
    if c.skip:
        t["W_skip"] = coder.W_skip
    cfg: dict[str, Any] = {
        "architecture": architecture(coder), "d_in": c.d_in, "d_sae": c.m, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": bool(getattr(c, "center_input", True)) and not c.d_out, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": about.get("model"), "hook_name": about.get("hook"),
                     "context_size": about.get("context"), "dataset_path": about.get("corpus"),
                     "prepend_bos": about.get("prepend_bos"), "sparsecode_method": method,
                     "sparsecode_options": coder.config_dict()}}
    if c.d_out:  # the target's hook from a paired store's manifest, where SAELens's hooked models look for it
        cfg["d_out"] = c.d_out
        cfg["metadata"].update(hook_name_out=about.get("hook_out"), sparsecode_hook_point=about.get("hook_point"),
                               sparsecode_hook_point_out=about.get("hook_point_out"))
    if method == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if method == "mp":
        cfg.update(max_iterations=c.k, residual_threshold=0.0, stop_on_duplicate_support=False)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in t.items()}, folder / WEIGHTS)
    atomic_write_json(folder / CFG, cfg)
    if about.get("density") is not None:
        save_file({"sparsity": about["density"].float().clamp_min(1e-10).log10()}, folder / SPARSITY)


def read(folder: Path) -> Foreign:
    cfg = read_config(folder / CFG)
    where = folder / CFG
    arch = cfg.get("architecture", "standard")
    known = sorted(set(ARCH.values()) | TRANSCODER_ARCHS)
    if arch not in known:
        raise SparsecodeError(f"{where}: architecture {arch!r} has no sparsecode method (sparsecode reads "
                              f"{', '.join(known)})")
    for key in ("normalize_activations", "reshape_activations"):
        if cfg.get(key, "none") not in ("none", None):
            raise SparsecodeError(f"{where}: {key}={cfg[key]!r} is not supported (only 'none')")
    d, m = size(cfg, "d_in", where), size(cfg, "d_sae", where)
    center = flag(cfg, "apply_b_dec_to_input", True, where)
    transcoder = arch in TRANSCODER_ARCHS
    if transcoder and center:
        raise SparsecodeError(f"{where}: a {arch} with apply_b_dec_to_input=true (SAELens refuses it too)")
    d_out = size(cfg, "d_out", where) if transcoder else d
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    tensors = read_tensors(folder / WEIGHTS)
    wpath = folder / WEIGHTS
    W_dec, b_dec = need(tensors, "W_dec", (m, d_out), wpath), need(tensors, "b_dec", (d_out,), wpath)
    origin = {"format": NAME, "architecture": arch, "path": str(folder), "model": meta.get("model_name"),
              "hook": meta.get("hook_name"), **({"hook_out": meta.get("hook_name_out")} if transcoder else {})}
    if arch == "matching_pursuit":
        steps = cfg.get("max_iterations") or d
        if cfg.get("residual_threshold", 1e-2) not in (0, 0.0, None) or cfg.get("stop_on_duplicate_support", True):
            raise SparsecodeError(f"{where}: matching pursuit with an early stop (residual_threshold="
                                  f"{cfg.get('residual_threshold', 1e-2)}, stop_on_duplicate_support="
                                  f"{cfg.get('stop_on_duplicate_support', True)}) has no sparsecode method: "
                                  f"sparsecode's mp runs max_iterations rounds")
        if not center:  # b_dec is then neither subtracted nor added: a zero bias is the same SAE
            b_dec = torch.zeros_like(b_dec)
        return Foreign("mp", {"d_in": d, "m": m, "k": steps}, {"W_dec": W_dec, "b_dec": b_dec},
                       mp_reference(W_dec, b_dec, steps), origin)
    W_enc, b_enc = need(tensors, "W_enc", (d, m), wpath), need(tensors, "b_enc", (m,), wpath)
    state = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    options: dict[str, Any] = {"d_in": d, "m": m, "center_input": center}
    skip = need(tensors, "W_skip", (d_out, d), wpath) if "skip" in arch else None
    if transcoder:  # the encoder reads x whatever center_input says: the option is left at its default
        options = {"d_in": d, "m": m, "d_out": d_out, "skip": skip is not None}
        state.update({"W_skip": skip} if skip is not None else {})
    if arch in ("standard", "transcoder", "skip_transcoder"):
        return Foreign("relu", options, state, sae_reference(W_enc, b_enc, W_dec, b_dec, center, W_skip=skip),
                       origin)
    if arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm", False):
            raise SparsecodeError(f"{where}: rescale_acts_by_decoder_norm=true is not supported")
        k = size(cfg, "k", where)
        return Foreign("topk", {**options, "k": k}, state,
                       sae_reference(W_enc, b_enc, W_dec, b_dec, center, k=k), origin)
    theta = need(tensors, "threshold", (m,), wpath)
    reference = sae_reference(W_enc, b_enc, W_dec, b_dec, center, threshold=theta, W_skip=skip)
    kept = meta.get("sparsecode_method")
    if kept in ("batchtopk", "matryoshka") and bool((theta == theta[0]).all()) and float(theta[0]) >= 0:
        opts = dict(meta.get("sparsecode_options") or {})
        opts.update(options)
        return Foreign(kept, opts, {**state, "threshold": theta[0].clone(), "threshold_ema": theta[0].clone()},
                       reference, origin)
    return Foreign("jumprelu", options, {**state, "theta": held_threshold(theta, where)}, reference,
                   origin)


def held_threshold(theta: Tensor, where: Path) -> Tensor:
    """A file's JumpReLU θ as sparsecode's jumprelu holds it: trained directly, so kept bit for bit; θ < 0 refused."""
    if not bool((theta >= 0).all()):
        raise SparsecodeError(f"{where}: threshold holds {int((theta < 0).sum())} values < 0; sparsecode's "
                              f"jumprelu holds thresholds ≥ 0")
    return theta.clone()
