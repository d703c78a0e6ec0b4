"""Spliced downstream loss: run the model with the hooked activation replaced by its reconstruction.

Causal LMs score next-token cross-entropy. Encoders without an LM head (MiniLM, BERT) score the
embedding they exist to produce: 1 − cos between the clean and the spliced mean-pooled last hidden state
(0 when clean). Either way, loss recovered = (L_zero − L_spliced) / (L_zero − L_clean), as SAELens and
SAEBench report it: 1 for a perfect reconstruction, 0 for zero-ablation. A transcoder (a paired store's) is
spliced at its target site, its output computed from the activation at its input site in the same pass (`read`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coder import Coder
from .config import check
from .data.contexts import Layout, pack
from .data.corpus import open_corpus
from .data.source import split_rows
from .data.store import Store
from .device import pick_device
from .errors import SparsecodeError
from .model import find_module, load_model

Patch = Callable[[Tensor], Tensor]


def reconstruct_with(coder: Coder) -> Patch:
    """[..., d] activations → their reconstruction through the coder's Code."""

    def patch(a: Tensor) -> Tensor:
        flat = a.reshape(-1, a.shape[-1]).float()
        return coder.decode(coder.encode(flat)).reshape(a.shape).to(a.dtype)

    return patch


def transcode_with(coder: Coder) -> Patch:
    """[..., d_in] input-site activations → the coder's output [..., d_out] (a transcoder's, skip path included)."""

    def patch(a: Tensor) -> Tensor:
        flat = a.reshape(-1, a.shape[-1]).float()
        return coder.transcode(flat).reshape(*a.shape[:-1], -1).to(a.dtype)

    return patch


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"] if "hidden_states" in kwargs else next(v for v in kwargs.values()
                                                                          if isinstance(v, Tensor))


@contextmanager
def captured(module: nn.Module, point: str = "output") -> Iterator[list[Tensor]]:
    """Yield a list that receives the module's output (or first input) at each forward pass while open."""
    check(point in ("output", "input"), f"hook point must be output or input, got {point!r}")
    seen: list[Tensor] = []
    if point == "output":
        handle = module.register_forward_hook(
            lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(_first_input(args, kwargs)),
                                                  with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def patched(module: nn.Module, fn: Patch, point: str = "output", where: Tensor | None = None) -> Iterator[None]:
    """Replace the module's output (or first input) by fn(it) at the positions `where` [B, T] (all if None)."""
    check(point in ("output", "input"), f"hook point must be output or input, got {point!r}")

    def swap(a: Tensor) -> Tensor:
        new = fn(a)
        return new if where is None else torch.where(where[..., None].to(a.device), new, a)

    if point == "output":
        def hook(m: nn.Module, args: Any, out: Any) -> Any:
            return (swap(out[0]), *out[1:]) if isinstance(out, tuple) else swap(out)
        handle = module.register_forward_hook(hook)
    else:
        def pre(m: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                return (swap(args[0]), *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items()
                                                                         if isinstance(v, Tensor))
            return args, {**kwargs, key: swap(kwargs[key])}
        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def is_causal_lm(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


def _outputs(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """Per-row figure of one forward pass: [B, T-1] token losses (LM) or [B, h] pooled embeddings."""
    out = model(input_ids=ids, attention_mask=mask)
    if is_causal_lm(model):
        logits = out.logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="none").reshape(ids.shape[0], -1)
    h = out.last_hidden_state.float()
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


@torch.no_grad()
def spliced_loss(model: nn.Module, hook: str, patch: Patch, ids: Tensor, mask: Tensor | None = None,
                 point: str = "output", where: Tensor | None = None, batch_size: int = 16,
                 read: tuple[str, str] | None = None) -> dict[str, Any]:
    """Clean, spliced and zero-ablated downstream loss over token contexts `ids` [N, T], and loss recovered.

    `read` (module, point): the spliced run's patch reads the activation there, not the one it replaces (a
    transcoder: e.g. an MLP's output replaced by the coder applied to the MLP's input)."""
    check(ids.ndim == 2, f"token ids must be [contexts, tokens], got {tuple(ids.shape)}")
    module = find_module(model, hook)
    device = next(model.parameters()).device
    mask = torch.ones_like(ids) if mask is None else mask
    causal = is_causal_lm(model)
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    for s in range(0, ids.shape[0], batch_size):
        b_ids, b_mask = ids[s : s + batch_size].to(device), mask[s : s + batch_size].to(device)
        b_where = None if where is None else where[s : s + batch_size].to(device)
        clean = _outputs(model, b_ids, b_mask)
        runs = {"clean": clean}
        for name, fn in (("spliced", patch), ("zero", torch.zeros_like)):
            with ExitStack() as stack:
                if name == "spliced" and read is not None:
                    seen = stack.enter_context(captured(find_module(model, read[0]), read[1]))
                    fn = (lambda a, seen=seen: patch(seen[-1]))  # noqa: E731 - the read site's latest rows
                stack.enter_context(patched(module, fn, point, b_where))
                runs[name] = _outputs(model, b_ids, b_mask)
        if causal:
            valid = b_mask[:, 1:].bool()
            for name, losses in runs.items():
                totals[name] += losses[valid].sum().item()
            count += int(valid.sum())
        else:
            for name, emb in runs.items():
                totals[name] += (1 - F.cosine_similarity(emb, clean, dim=1)).sum().item()
            count += b_ids.shape[0]
    loss = {k: v / max(count, 1) for k, v in totals.items()}
    gap = loss["zero"] - loss["clean"]
    return {
        "metric": "next-token CE" if causal else "1 - cos(pooled embedding)",
        "loss_clean": loss["clean"],
        "loss_spliced": loss["spliced"],
        "loss_zero": loss["zero"],
        "loss_increase": loss["spliced"] - loss["clean"],
        "loss_recovered": (loss["zero"] - loss["spliced"]) / gap if abs(gap) > 1e-12 else float("nan"),
    }


def splice_store(coder: Coder, store_path: str, heldout: float = 0.05, contexts: int = 16,
                 device: str = "auto") -> dict[str, Any]:
    """Spliced loss on contexts rebuilt from a store's held-out region (its model, hook, corpus, layout)."""
    store = Store(store_path, verify=False)
    m = store.manifest
    first = split_rows(store.n, heldout, "eval").start if heldout > 0 else 0
    start = torch.tensor([first])
    cursor = (int(store.gather(start, "doc")[0]), int(store.gather(start, "pos")[0]))
    model, tokenizer, revision = load_model(m["model"], m.get("revision"), pick_device(device), m.get("tokenizer"))
    if revision != m["model_revision"]:
        raise SparsecodeError(f"model {m['model']!r} changed since the harvest of {store_path} "
                              f"({revision} now, {m['model_revision']} then)")
    layout = Layout.of(tokenizer, m["context"], m["prepend_bos"])
    ctxs = list(islice(pack(open_corpus(m["corpus"], m["text_field"]), tokenizer, layout, cursor), contexts))
    ids = torch.tensor([c.ids for c in ctxs])
    mask = torch.tensor([c.mask for c in ctxs])
    where = torch.tensor([c.pos for c in ctxs]) >= 0  # only positions the code was trained on
    device = next(model.parameters()).device
    if next(iter(coder.buffers())).device != device:  # a copy: the caller's coder stays where it is
        coder = copy.deepcopy(coder).to(device)
    if m.get("target"):  # a paired store: splice the coder's output at the target, computed from the hook's input
        result = spliced_loss(model, m["target"], transcode_with(coder), ids, mask, m["target_point"], where,
                              read=(m["hook"], m["hook_point"]))
    else:
        result = spliced_loss(model, m["hook"], reconstruct_with(coder), ids, mask, m["hook_point"], where)
    return {**result, "contexts": len(ctxs)}
