"""What an intervention does: KL and target log-probs on prompts, the side effect on held-out text, sweeps of the
steering strength (printed and plotted), per-token attribution, generation, and a run's model, hook and text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coder import Coder
from .config import check
from .errors import SparsecodeError
from .intervene import Intervention, feature_values, outputs
from .splice import is_causal_lm


def pooled(h: Tensor, mask: Tensor | None = None) -> Tensor:
    """[B, h] mean of the hidden states over the attended tokens (as sentence embedders pool)."""
    mask = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device)
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def kl(clean_logits: Tensor, edited_logits: Tensor) -> Tensor:
    """KL(clean ‖ edited) of the distributions over the last dimension."""
    p = clean_logits.log_softmax(-1)
    return (p.exp() * (p - edited_logits.log_softmax(-1))).sum(-1)


def _last(mask: Tensor | None, ids: Tensor) -> Tensor:
    """[B] index of each row's last attended token."""
    return (mask.sum(1) - 1).long() if mask is not None else torch.full((ids.shape[0],), ids.shape[1] - 1)


@torch.no_grad()
def effect(iv: Intervention, ids: Tensor, mask: Tensor | None = None,
           targets: Sequence[int] | None = None) -> dict[str, Any]:
    """The edit's effect on prompts ids [B, T]: causal LMs: KL(clean ‖ edited) of the next-token distribution after
    each prompt and, for `targets`, the change of their log-probability there (efficacy: that change, else the
    KL); encoders: 1 − cos of the pooled embedding (the efficacy)."""
    r = iv.run(ids, mask)
    rows = torch.arange(ids.shape[0])
    if not r.causal:
        gap = (1 - F.cosine_similarity(pooled(r.clean, mask), pooled(r.edited, mask), dim=1)).mean().item()
        return {"metric": "1 - cos(pooled embedding)", "efficacy": gap, "cos_gap": gap}
    last = _last(mask, ids).to(r.clean.device)
    clean, edited = r.clean[rows, last], r.edited[rows, last]
    out: dict[str, Any] = {"kl": kl(clean, edited).mean().item()}
    if targets:
        t = torch.as_tensor(list(targets), device=clean.device)
        delta = edited.log_softmax(-1)[:, t] - clean.log_softmax(-1)[:, t]
        out["target_logp_change"] = delta.mean().item()
        out["target_p_clean"] = clean.softmax(-1)[:, t].mean().item()
        out["target_p_edited"] = edited.softmax(-1)[:, t].mean().item()
    out["metric"] = "target log-prob change" if targets else "next-token KL(clean||edited)"
    out["efficacy"] = out["target_logp_change"] if targets else out["kl"]
    return out


@torch.no_grad()
def side_effect(iv: Intervention, ids: Tensor, mask: Tensor, where: Tensor | None = None,
                batch_size: int = 8) -> dict[str, Any]:
    """The edit applied on held-out contexts ids [N, T] at `where` [N, T] (all if None): causal LMs: next-token
    CE clean and edited; encoders: mean 1 − cos of the pooled embedding (as splice.py scores a splice)."""
    causal = is_causal_lm(iv.model)
    total = {"clean": 0.0, "edited": 0.0}
    count = 0
    for s in range(0, ids.shape[0], batch_size):
        b_ids, b_mask = ids[s : s + batch_size], mask[s : s + batch_size]
        b_iv = iv.at(None if where is None else where[s : s + batch_size])
        r = b_iv.run(b_ids, b_mask)
        if causal:
            valid = b_mask[:, 1:].bool().to(r.clean.device)
            labels = b_ids[:, 1:].to(r.clean.device)
            for name, logits in (("clean", r.clean), ("edited", r.edited)):
                ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
                total[name] += ce[valid].sum().item()
            count += int(valid.sum())
        else:
            gap = 1 - F.cosine_similarity(pooled(r.clean, b_mask), pooled(r.edited, b_mask), dim=1)
            total["edited"] += gap.sum().item()
            count += b_ids.shape[0]
    mean = {k: v / max(count, 1) for k, v in total.items()}
    if causal:
        return {"metric": "next-token CE increase", "ce_clean": mean["clean"], "ce_edited": mean["edited"],
                "side_effect": mean["edited"] - mean["clean"], "contexts": ids.shape[0]}
    return {"metric": "1 - cos(pooled embedding)", "side_effect": mean["edited"], "contexts": ids.shape[0]}


@torch.no_grad()
def sweep(make: Callable[[float], Intervention], alphas: Sequence[float], ids: Tensor, mask: Tensor | None = None,
          targets: Sequence[int] | None = None,
          heldout: tuple[Tensor, Tensor, Tensor] | None = None) -> list[dict[str, Any]]:
    """Efficacy (`effect` on the prompts) and side effect (`side_effect` on held-out (ids, mask, where), when
    given) of the intervention `make(α)` for each steering strength α."""
    rows = []
    for a in alphas:
        iv = make(float(a))
        row = {"alpha": float(a), **effect(iv, ids, mask, targets)}
        if heldout is not None:
            side = side_effect(iv, *heldout)
            row.update(side_effect=side["side_effect"], side_metric=side["metric"])
        rows.append(row)
    return rows


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Efficacy and side effect against α, and efficacy against side effect, as a PNG at `path`."""
    from .files import atomic_write
    from .report import _plt, _png

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    alphas = [r["alpha"] for r in rows]
    eff = [r["efficacy"] for r in rows]
    side = [r.get("side_effect", float("nan")) for r in rows]
    a.plot(alphas, eff, "o-", label=f"efficacy: {rows[0]['metric']}")
    if "side_effect" in rows[0]:
        a.plot(alphas, side, "s--", label=f"side effect: {rows[0]['side_metric']}")
        b.plot(side, eff, "o-")
        for s, e, al in zip(side, eff, alphas, strict=True):
            b.annotate(f"{al:g}", (s, e), fontsize=8)
    a.set_xlabel("steering strength alpha")
    a.legend(fontsize=8)
    b.set_xlabel("side effect (held-out text)")
    b.set_ylabel("efficacy (prompts)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _png(fig))
    return path


@torch.no_grad()
def attribution(model: nn.Module, coder: Coder, hook: str, ids: Tensor, feature: int, point: str = "output",
                target: int | None = None, positions: Sequence[int] | None = None,
                batch_size: int = 16) -> dict[str, Tensor]:
    """Per position t of one sequence ids [T]: the feature's weight there and the change when it is ablated at t
    alone: causal LMs: of the mean next-token CE over the sequence, or of the logit of `target` after the last
    token; encoders: 1 − cos of the pooled embedding. Positions not in `positions` (all if None) are NaN."""
    base = Intervention(model, coder, hook, point)
    base.ablate([feature])
    causal = is_causal_lm(model)
    check(target is None or causal, "a target token needs a causal LM")
    T = ids.shape[0]
    todo = sorted({p % T for p in positions}) if positions is not None else list(range(T))
    with base.at(torch.zeros(T, dtype=torch.bool)) as probe:  # the clean run, reading the code
        clean = outputs(model, ids[None])
    values = feature_values(probe.first_code(), feature).float().cpu()

    def score(out: Tensor) -> Tensor:
        if not causal:
            return 1 - F.cosine_similarity(pooled(out), pooled(clean), dim=1)
        if target is not None:
            return out[:, -1, target]
        labels = ids[1:].to(out.device).expand(out.shape[0], -1)
        return F.cross_entropy(out[:, :-1].transpose(1, 2), labels, reduction="none").mean(1)

    reference = score(clean)
    delta = torch.full((T,), float("nan"))
    for s in range(0, len(todo), batch_size):
        chunk = torch.tensor(todo[s : s + batch_size])
        where = torch.zeros(len(chunk), T, dtype=torch.bool)
        where[torch.arange(len(chunk)), chunk] = True
        with base.at(where):
            out = outputs(model, ids[None].expand(len(chunk), -1))
        delta[chunk] = (score(out) - reference).float().cpu()
    return {"values": values, "effect": delta}


@torch.no_grad()
def generate(model: nn.Module, ids: Tensor, new_tokens: int, iv: Intervention | None = None,
             where: Tensor | None = None) -> Tensor:
    """Greedy continuation [T + new_tokens] of one prompt ids [T], the whole sequence re-run at each step (no
    cache: the edit sees every position every time), edited at `where` [T] (all if None) and every new token."""
    seq = ids.clone()
    for _ in range(new_tokens):
        if iv is None:
            logits = outputs(model, seq[None])
        else:
            grown = None if where is None else torch.cat([where, where.new_ones(len(seq) - len(where))])
            with iv.at(grown):
                logits = outputs(model, seq[None])
        seq = torch.cat([seq, logits[0, -1].argmax().view(1).to(seq)])
    return seq


def nearest_tokens(model: nn.Module, tokenizer: Any, vector: Tensor, n: int = 8) -> list[tuple[str, float]]:
    """The n tokens whose input embeddings are nearest (cosine) to `vector`, with the cosine."""
    emb = model.get_input_embeddings().weight.detach().float()
    cos = F.cosine_similarity(emb, vector.detach().float().to(emb.device)[None], dim=1)
    top = cos.topk(min(n, cos.numel()))
    return [(tokenizer.decode([int(i)]), float(c)) for c, i in zip(top.values, top.indices, strict=True)]


# --- a run's model, hook and held-out text ------------------------------------------------------------------
@dataclass
class Target:
    """What a run's coder is attached to: the model, tokenizer, hook and how its store built contexts."""

    coder: Coder
    model: nn.Module
    tokenizer: Any
    hook: str
    point: str
    model_name: str
    context: int  # the longest prompt: the store's context, else the model's
    prepend_bos: bool
    manifest: dict[str, Any] | None  # the store's, when the run was trained on one
    heldout: float

    def intervention(self, **kw: Any) -> Intervention:
        return Intervention(self.model, self.coder, self.hook, self.point, **kw)

    def prompt(self, text: str, new_tokens: int = 0) -> tuple[Tensor, Tensor]:
        """(ids [T], content mask [T]) of a prompt, with the special tokens the store's contexts had (causal LMs:
        the prefix only, so that it can be continued); too long a prompt is one line."""
        from .data.contexts import Layout

        layout = Layout.of(self.tokenizer, max(self.context, 8), self.prepend_bos)
        body = self.tokenizer.encode(text, add_special_tokens=False)
        check(len(body) > 0, f"the prompt {text!r} has no tokens")
        causal = is_causal_lm(self.model)
        ids = layout.prefix + body + ([] if causal else layout.suffix)
        if len(ids) > self.context:
            raise SparsecodeError(f"the prompt has {len(ids)} tokens but the run takes at most {self.context} "
                                  f"(its store's context, or the model's); shorten it")
        limit = model_context(self.model)
        if causal and limit is not None and len(ids) + new_tokens > limit:
            raise SparsecodeError(f"the prompt's {len(ids)} tokens and {new_tokens} new ones exceed the model's "
                                  f"context of {limit}; lower --max-new-tokens")
        content = [False] * len(layout.prefix) + [True] * len(body) + [False] * (len(ids) - len(layout.prefix)
                                                                                - len(body))
        return torch.tensor(ids), torch.tensor(content)

    def heldout_contexts(self, contexts: int = 8) -> tuple[Tensor, Tensor, Tensor] | None:
        """(ids, mask, where) of contexts rebuilt from the store's held-out region, `where` marking the positions
        the code was trained on (as splice.splice_store builds them); None without a store."""
        from .data.contexts import Layout, pack
        from .data.corpus import open_corpus
        from .data.source import split_rows
        from .data.store import Store

        if self.manifest is None or contexts <= 0:
            return None
        m = self.manifest
        store = Store(m["_path"], verify=False)
        first = split_rows(store.n, self.heldout, "eval").start if self.heldout > 0 else 0
        start = torch.tensor([first])
        cursor = (int(store.gather(start, "doc")[0]), int(store.gather(start, "pos")[0]))
        layout = Layout.of(self.tokenizer, m["context"], m["prepend_bos"])
        ctxs = list(islice(pack(open_corpus(m["corpus"], m["text_field"]), self.tokenizer, layout, cursor),
                           contexts))
        if not ctxs:
            return None
        pos = torch.tensor([c.pos for c in ctxs])
        return torch.tensor([c.ids for c in ctxs]), torch.tensor([c.mask for c in ctxs]), pos >= 0


def model_context(model: nn.Module) -> int | None:
    """The model's longest input (max_position_embeddings), when its config names one."""
    n = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return int(n) if n else None


def load_target(run: str | Path, model: str | None = None, hook: str | None = None,
                device: str = "auto") -> Target:
    """The run's coder attached where its store was harvested (model, hook, point, context from the store's
    manifest); `model` and `hook` override them (a run without a store needs both)."""
    from .device import pick_device
    from .files import read_json
    from .interop import load_coder
    from .model import load_model
    from .run_config import load_config

    run = Path(run)
    cfg = load_config(run)
    manifest = None
    if cfg.source is not None and cfg.source.kind == "store" and cfg.source.path:
        path = Path(cfg.source.path) / "manifest.json"
        if path.is_file():
            manifest = {**read_json(path), "_path": cfg.source.path}
        elif model is None or hook is None:
            raise SparsecodeError(f"the run's store {cfg.source.path} is gone; pass --model and --hook")
    if manifest is None and (model is None or hook is None):
        raise SparsecodeError(f"{run} was not trained on a store that names its model and hook; "
                              f"pass --model and --hook")
    m = manifest or {}
    own = model is None or model == m.get("model")
    name = model or m["model"]
    net, tokenizer, revision = load_model(name, m.get("revision") if own else None, pick_device(device),
                                          m.get("tokenizer") if own else None)
    if own and m.get("model_revision") and revision != m["model_revision"]:
        raise SparsecodeError(f"model {name!r} changed since the harvest of {m['_path']} "
                              f"({revision} now, {m['model_revision']} then)")
    coder = load_coder(run, device=next(net.parameters()).device)
    check(coder.cfg.sites == 1, f"{run} is a crosscoder (sites={coder.cfg.sites}); steering and ablating act at "
                                f"one site and take coders of one site")
    limits = [n for n in (model_context(net), m.get("context") if own else None) if n]
    point = m.get("hook_point", "output") if hook is None else "output"  # another hook: its output
    return Target(coder, net, tokenizer, hook or m["hook"], point, name, min(limits) if limits else 1 << 30,
                  bool(m.get("prepend_bos", True)), manifest if own else None,
                  cfg.source.heldout if cfg.source is not None else 0.05)
