"""Interventions: run a Hugging Face model with a trained code edited at its hook, and measure the effect.

An `Intervention` encodes the hooked activation x of every token, edits its Code (ablate, clamp, steer, force,
forbid, in the order asked), decodes it, and puts back x + (decode(edited) − decode(code)): the error term kept,
computed as a difference so that no edit gives x back bit for bit. With error_term=False it puts back
decode(edited) alone (the splice x → x̂). Every method goes through the same Code edits and its own decode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .code import Code
from .coder import Coder
from .config import check
from .errors import SparsecodeError
from .model import find_module
from .splice import is_causal_lm, patched

Edit = Callable[[Code, Tensor, Tensor], Code]  # (code, x rows, x̂ rows) -> edited code


# --- edits of a Code (generic: any method's code, decoded by its own decode) --------------------------------
def feature_values(code: Code, feature: int) -> Tensor:
    """[N] weight of `feature` in each row's code (0 where it is absent)."""
    return (code.values * (code.indices == feature)).sum(1)


def ablate_code(code: Code, features: Sequence[int]) -> Code:
    """The code with every slot of `features` set to weight 0."""
    hit = torch.isin(code.indices, torch.as_tensor(list(features), device=code.indices.device))
    return Code(code.indices, code.values.masked_fill(hit, 0), code.size)


def add_slot(code: Code, feature: int, values: Tensor) -> Code:
    """The code with one more slot holding `feature` at weight `values` [N] (an empty slot where it is 0)."""
    idx = torch.full_like(code.indices[:, :1], feature).masked_fill(values[:, None] == 0, -1)
    return Code(torch.cat([code.indices, idx], 1), torch.cat([code.values, values[:, None].to(code.values)], 1),
                code.size)


def clamp_code(code: Code, features: Sequence[int], value: float, where: str = "all") -> Code:
    """Each feature at weight `value` on every row ("all": a slot added where it is absent) or only on the rows
    where it already fires ("active"); its old slots are emptied first, so it is counted once."""
    check(where in ("all", "active"), f"clamp where must be 'all' or 'active', got {where!r}")
    for f in features:
        rows = torch.ones_like(code.indices[:, 0], dtype=torch.bool) if where == "all" else \
            ((code.indices == f) & (code.values != 0)).any(1)
        code = add_slot(ablate_code(code, [f]), f, rows.to(code.values.dtype) * value)
    return code


def steer_code(code: Code, feature: int, alpha: float) -> Code:
    """The code plus α of `feature` on every row: the decode moves by α·atom_f (the atom as stored)."""
    return add_slot(code, feature, torch.full_like(code.values[:, 0], alpha))


def force_code(code: Code, c: int, group: int | None = None) -> Code:
    """Codebooks: each row's code becomes c, at its slot's weight; the slot is c // group for codes with one
    slot per group of `group` codes (rvq's stages, kvbottleneck's heads), else the first."""
    slot = c // group if group else 0
    check(slot < code.k, f"code {c} falls in slot {slot}, but the code has {code.k} slots")
    idx = code.indices.clone()
    idx[:, slot] = c
    return Code(idx, code.values, code.size)


def forbid_code(code: Code, c: int, atoms: Tensor, x: Tensor, x_hat: Tensor, group: int | None = None) -> Code:
    """Rows whose code uses c: that slot takes the atom nearest (L2) to what it has to explain, (x − x̂)/v + atom_c,
    among all other atoms (those of c's group for grouped codes): for VQ, the nearest other code to x."""
    hit = (code.indices == c) & (code.values != 0)
    rows = hit.any(1)
    if not bool(rows.any()):
        return code
    slot = hit.int().argmax(1)[rows]  # the first slot holding c
    v = code.values[rows, slot].to(atoms.dtype)
    target = (x[rows] - x_hat[rows]) / v[:, None] + atoms[c]
    dist = torch.cdist(target, atoms.detach())
    banned = torch.zeros(atoms.shape[0], dtype=torch.bool, device=atoms.device)
    banned[c] = True
    if group:
        ids = torch.arange(atoms.shape[0], device=atoms.device)
        banned |= ids // group != c // group
    check(not bool(banned.all()), f"no code is left to replace code {c} with")
    idx = code.indices.clone()
    idx[rows.nonzero()[:, 0], slot] = dist.masked_fill(banned, float("inf")).argmin(1)
    return Code(idx, code.values, code.size)


# --- the intervention ---------------------------------------------------------------------------------------
class Intervention:
    """A coder attached to `model` at the module `hook` (its output or first input) as a context manager; the
    edits compose in the order asked, apply at `positions` (token indices, or a [B, T] / [T] bool mask; all if
    None) and the hook is removed on exit, also after an exception. `codes` keeps each forward's unedited Code,
    one row per token in [batch, token] order."""

    def __init__(self, model: nn.Module, coder: Coder, hook: str, point: str = "output", error_term: bool = True,
                 positions: Sequence[int] | Tensor | None = None):
        check(point in ("output", "input"), f"hook point must be output or input, got {point!r}")
        self.model, self.hook, self.point = model, hook, point
        self.module = find_module(model, hook)
        device = next(model.parameters()).device
        if next(iter(coder.buffers())).device != device:  # a copy: the caller's coder stays where it is
            coder = copy.deepcopy(coder).to(device)
        self.coder = coder
        self.error_term, self.positions = error_term, positions
        self.keep_norm = False
        self.edits: list[Edit] = []
        self.codes: list[Code] = []
        self._stack: ExitStack | None = None

    # --- edits (each returns self, so they chain) ---
    def check_feature(self, f: int) -> int:
        """f checked against the dictionary: one line naming m when it is outside [0, m)."""
        m = self.coder.cfg.m
        if not 0 <= int(f) < m:
            raise SparsecodeError(f"feature {f} is outside the run's dictionary of m={m} atoms (0..{m - 1})")
        return int(f)

    def ablate(self, features: int | Iterable[int]) -> Intervention:
        """Set the features' weights to 0."""
        fs = [self.check_feature(f) for f in _ints(features)]
        self.edits.append(lambda code, x, x_hat: ablate_code(code, fs))
        return self

    def clamp(self, features: int | Iterable[int], value: float, where: str = "all") -> Intervention:
        """Set the features' weights to `value` on every token ("all") or where they fire ("active")."""
        check(where in ("all", "active"), f"clamp where must be 'all' or 'active', got {where!r}")
        fs = [self.check_feature(f) for f in _ints(features)]
        self.edits.append(lambda code, x, x_hat: clamp_code(code, fs, value, where))
        return self

    def steer(self, feature: int, alpha: float, keep_norm: bool = False) -> Intervention:
        """Add α·atom_f (α in units of the atom as stored; SAE atoms are unit-norm); keep_norm rescales each
        edited row to ‖x‖. With the error term, α = 0 is exactly the clean model."""
        f = self.check_feature(feature)
        self.edits.append(lambda code, x, x_hat: steer_code(code, f, alpha))
        self.keep_norm = self.keep_norm or keep_norm
        return self

    def force(self, code: int) -> Intervention:
        """Codebooks: every token takes code `code` (see `force_code`)."""
        c = self.check_feature(code)
        self.edits.append(lambda cd, x, x_hat: force_code(cd, c, self._group()))
        return self

    def forbid(self, code: int) -> Intervention:
        """Codebooks: tokens on code `code` take the nearest other one (see `forbid_code`)."""
        c = self.check_feature(code)
        self.edits.append(lambda cd, x, x_hat: forbid_code(cd, c, self.coder.atoms().float(), x, x_hat,
                                                           self._group()))
        return self

    def _group(self) -> int | None:
        group = getattr(self.coder, "K", None)  # codes per slot of rvq (a stage) and kvbottleneck (a head)
        return group if isinstance(group, int) and group < self.coder.cfg.m else None

    def at(self, positions: Sequence[int] | Tensor | None) -> Intervention:
        """A copy with the same edits at other positions."""
        other = copy.copy(self)
        other.positions, other.codes, other._stack = positions, [], None
        return other

    # --- the hook ---
    def patch(self, a: Tensor) -> Tensor:
        """[..., T, d] hooked activations → the edited ones (unchanged outside `positions`)."""
        d = self.coder.cfg.d_in
        if a.shape[-1] != d:
            raise SparsecodeError(f"the run's coder reads d_in={d}, but {self.hook!r} gives width {a.shape[-1]}: "
                                  f"it was trained on another hook or model")
        x = a.reshape(-1, d).float()
        code = self.coder.encode(x)
        self.codes.append(code.detach())
        x_hat = self.coder.decode(code).float()
        edited = code
        for edit in self.edits:
            edited = edit(edited, x, x_hat)
        decoded = x_hat if edited is code else self.coder.decode(edited).float()
        new = x + (decoded - x_hat) if self.error_term else decoded
        if self.keep_norm:
            new = new * (x.norm(dim=1, keepdim=True) / new.norm(dim=1, keepdim=True).clamp_min(1e-12))
        new = new.reshape(a.shape).to(a.dtype)
        where = self._where(a.shape[:-1], a.device)
        return new if where is None else torch.where(where[..., None], new, a)

    def _where(self, lead: torch.Size, device: torch.device) -> Tensor | None:
        """[*lead] bool mask of the edited positions (None: all)."""
        p = self.positions
        if p is None:
            return None
        if isinstance(p, Tensor) and p.dtype == torch.bool:
            if p.shape != lead and p.shape != lead[-1:]:
                raise SparsecodeError(f"positions mask has shape {tuple(p.shape)}, the hooked tensor "
                                      f"{tuple(lead)} tokens")
            return p.to(device).expand(lead)
        idx = torch.as_tensor(list(_ints(p)), dtype=torch.long)
        n = lead[-1]
        bad = idx[(idx >= n) | (idx < -n)]
        if bad.numel():
            raise SparsecodeError(f"position {int(bad[0])} is outside the {n} tokens of the input")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[idx] = True
        return mask.to(device).expand(lead)

    def __enter__(self) -> Intervention:
        self.codes = []
        self._stack = ExitStack()
        self._stack.enter_context(patched(self.module, self.patch, self.point))
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    # --- read-outs ---
    @torch.no_grad()
    def run(self, ids: Tensor, mask: Tensor | None = None) -> Readout:
        """The model's outputs on ids [B, T] without and with the edit, and the code of the hooked tokens."""
        clean = outputs(self.model, ids, mask)
        with self:
            edited = outputs(self.model, ids, mask)
        return Readout(clean, edited, self.first_code(), is_causal_lm(self.model))

    def first_code(self) -> Code:
        """The code of the first forward since entering (one line if the hooked module never ran)."""
        if not self.codes:
            raise SparsecodeError(f"the module {self.hook!r} did not run in the forward pass; pick another --hook")
        return self.codes[0]


@dataclass
class Readout:
    """One prompt batch run clean and edited."""

    clean: Tensor  # [B, T, vocab] logits of a causal LM, or [B, T, h] last hidden state of an encoder
    edited: Tensor
    code: Code  # the unedited code, one row per token in [batch, token] order
    causal: bool

    def next_token_probs(self) -> tuple[Tensor, Tensor]:
        """Clean and edited next-token distributions [B, T, vocab] (causal LMs)."""
        check(self.causal, "next-token distributions need a causal LM (this model has no LM head)")
        return self.clean.softmax(-1), self.edited.softmax(-1)


def _ints(v: int | Iterable[int] | Tensor) -> list[int]:
    if isinstance(v, Tensor):
        return [int(i) for i in v.flatten().tolist()]
    return [int(v)] if isinstance(v, int) else [int(i) for i in v]


# --- running the model --------------------------------------------------------------------------------------
def outputs(model: nn.Module, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """[B, T, vocab] logits of a causal LM, or [B, T, h] last hidden state of an encoder (float32)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    out = model(input_ids=ids, attention_mask=mask)
    return (out.logits if is_causal_lm(model) else out.last_hidden_state).float()


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
    from .train import load_config

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
    limits = [n for n in (model_context(net), m.get("context") if own else None) if n]
    point = m.get("hook_point", "output") if hook is None else "output"  # another hook: its output
    return Target(coder, net, tokenizer, hook or m["hook"], point, name, min(limits) if limits else 1 << 30,
                  bool(m.get("prepend_bos", True)), manifest if own else None,
                  cfg.source.heldout if cfg.source is not None else 0.05)
