"""dictionary_learning's on-disk dictionary: `ae.pt` (a torch state dict) + `config.json` whose
trainer.dict_class names the class its `load_dictionary` builds.

topk → AutoEncoderTopK; batchtopk → BatchTopKSAE and matryoshka → MatryoshkaBatchTopKSAE (their threshold
buffer is our inference threshold); jumprelu → JumpReluAutoEncoder, which encodes x itself, so a centred
encoder is folded (b_enc − W_enc·b_dec, in float64); relu → AutoEncoder, whose loader rescales atoms to unit
norm, so the norms are folded into the encoder before writing (x̂ unchanged, activations × ‖W_dec,i‖).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..coder import Coder
from ..errors import SparsecodeError
from ..files import atomic_write_json
from .foreign import Foreign, need, read_config, read_torch, sae_reference, size
from .saelens import held_threshold

NAME = "dictionary_learning"
CFG, WEIGHTS = "config.json", "ae.pt"
CLASS = {"topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE", "matryoshka": "MatryoshkaBatchTopKSAE",
         "jumprelu": "JumpReluAutoEncoder", "relu": "AutoEncoder"}
HOLDS = tuple(CLASS)
RESCALED = ("relu",)  # methods whose activations the format rescales (by ‖W_dec,i‖); x̂ is unchanged


def found(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def uncentred_bias(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """b_enc − W_enc·b_dec: the bias of the same encoder reading x instead of x − b_dec (float64 sums)."""
    return (b_enc.double() - W_enc.double() @ b_dec.double()).float()


def unit_atoms(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The same ReLU SAE with unit-norm atoms: encoder rows and biases × ‖W_dec,i‖, atoms ÷ it."""
    n = W_dec.norm(dim=1).clamp_min(1e-8)
    return W_enc * n[:, None], b_enc * n, W_dec / n[:, None]


def write(coder: Coder, about: dict[str, Any], folder: Path) -> None:
    c, method = coder.cfg, coder.name
    W_enc, b_enc, W_dec, b_dec = (p.detach().float().clone() for p in (coder.W_enc, coder.b_enc, coder.W_dec,
                                                                        coder.b_dec))
    center = bool(getattr(c, "center_input", True))
    if method == "jumprelu":
        if center:
            b_enc = uncentred_bias(W_enc, b_enc, b_dec)
        state = {"W_enc": W_enc.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                 "threshold": coder.theta.detach()}
    else:
        if not center:
            raise SparsecodeError(f"dictionary_learning's {CLASS[method]} encodes x − b_dec; this SAE reads x "
                                  f"uncentred (center_input=false)")
        if method == "relu":
            W_enc, b_enc, W_dec = unit_atoms(W_enc, b_enc, W_dec)
            state = {"bias": b_dec, "encoder.weight": W_enc, "encoder.bias": b_enc, "decoder.weight": W_dec.T}
        elif method == "matryoshka":
            sizes = torch.tensor(coder.sizes).diff(prepend=torch.tensor([0]))
            state = {"k": torch.tensor(c.k, dtype=torch.int), "threshold": coder.threshold.detach().float(),
                     "group_sizes": sizes, "W_enc": W_enc.T, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        else:
            threshold = coder.threshold.detach().float() if method == "batchtopk" else torch.tensor(-1.0)
            state = {"k": torch.tensor(c.k, dtype=torch.int), "threshold": threshold, "decoder.weight": W_dec.T,
                     "encoder.weight": W_enc, "encoder.bias": b_enc, "b_dec": b_dec}
    torch.save({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS)
    trainer = {"dict_class": CLASS[method], "activation_dim": c.d_in, "dict_size": c.m,
               "lm_name": about.get("model"), "submodule_name": about.get("hook"),
               "trainer_class": "sparsecode export", "sparsecode_method": method,
               "sparsecode_options": coder.config_dict()}
    if hasattr(c, "k"):
        trainer["k"] = c.k
    atomic_write_json(folder / CFG, {"trainer": trainer})


def read(folder: Path) -> Foreign:
    where = folder / CFG
    trainer = read_config(where).get("trainer")
    if not isinstance(trainer, dict):
        raise SparsecodeError(f"{where}: no 'trainer' object")
    cls = trainer.get("dict_class")
    by_class = {v: k for k, v in CLASS.items()}
    if cls not in by_class:
        raise SparsecodeError(f"{where}: dict_class {cls!r} has no sparsecode method (sparsecode reads "
                              f"{', '.join(sorted(by_class))})")
    method = by_class[cls]
    t, wpath = read_torch(folder / WEIGHTS), folder / WEIGHTS
    origin = {"format": NAME, "architecture": cls, "path": str(folder), "model": trainer.get("lm_name"),
              "hook": trainer.get("submodule_name")}
    if method in ("jumprelu", "matryoshka"):  # W_enc [d, m], W_dec [m, d]
        if "W_enc" not in t:
            raise SparsecodeError(f"{wpath}: no tensor 'W_enc' (it holds {', '.join(sorted(t))})")
        d, m = t["W_enc"].shape if t["W_enc"].ndim == 2 else (0, 0)
        W_enc, b_enc = need(t, "W_enc", (d, m), wpath).T.contiguous(), need(t, "b_enc", (m,), wpath)
        W_dec, b_dec = need(t, "W_dec", (m, d), wpath), need(t, "b_dec", (d,), wpath)
    else:  # nn.Linear layout: encoder.weight [m, d], decoder.weight [d, m]
        if "encoder.weight" not in t or t["encoder.weight"].ndim != 2:
            raise SparsecodeError(f"{wpath}: no 2-d tensor 'encoder.weight' (it holds {', '.join(sorted(t))})")
        m, d = t["encoder.weight"].shape
        W_enc, b_enc = need(t, "encoder.weight", (m, d), wpath), need(t, "encoder.bias", (m,), wpath)
        W_dec = need(t, "decoder.weight", (d, m), wpath).T.contiguous()
        b_dec = need(t, "bias" if method == "relu" else "b_dec", (d,), wpath)
    for key, value in (("activation_dim", d), ("dict_size", m)):
        if trainer.get(key, value) != value:
            raise SparsecodeError(f"{where}: {key}={trainer[key]} but {wpath.name} holds {value}")
    options: dict[str, Any] = {"d_in": d, "m": m}
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if method == "relu":  # its loader rescales atoms to unit norm: hold what it holds
        W_enc, b_enc, W_dec = unit_atoms(W_enc, b_enc, W_dec)
        state.update(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec)
        return Foreign(method, options, state, sae_reference(W_enc.T, b_enc, W_dec, b_dec, True), origin)
    if method == "jumprelu":
        theta = need(t, "threshold", (m,), wpath)
        return Foreign(method, {**options, "center_input": False}, {**state, "theta": held_threshold(theta, wpath)},
                       sae_reference(W_enc.T, b_enc, W_dec, b_dec, False, threshold=theta), origin)
    k = int(need(t, "k", (), wpath)) if "k" in t else size(trainer, "k", where)
    if not 0 < k <= m:
        raise SparsecodeError(f"{where}: k={k} must be in 1..{m}")
    options["k"] = k
    if method == "topk":
        return Foreign(method, options, state, sae_reference(W_enc.T, b_enc, W_dec, b_dec, True, k=k), origin)
    theta = need(t, "threshold", (), wpath)
    if float(theta) < 0:
        raise SparsecodeError(f"{wpath}: threshold {float(theta)} was never estimated (< 0): {cls} encodes "
                              f"with it at inference")
    kept = trainer.get("sparsecode_options") if trainer.get("sparsecode_method") == method else None
    options = {**(kept if isinstance(kept, dict) else {}), **options}
    if method == "matryoshka":
        sizes = need(t, "group_sizes", tuple(t["group_sizes"].shape) if "group_sizes" in t else (1,), wpath)
        ends = sizes.long().cumsum(0)
        if sizes.ndim != 1 or bool((sizes <= 0).any()) or int(ends[-1]) != m:
            raise SparsecodeError(f"{wpath}: group_sizes must be positive and sum to dict_size={m}")
        options["prefixes"] = ",".join(f"{int(e)}/{m}" for e in ends)
    return Foreign(method, options, {**state, "threshold": theta.clone(), "threshold_ema": theta.clone()},
                   sae_reference(W_enc.T, b_enc, W_dec, b_dec, True, threshold=theta), origin)
