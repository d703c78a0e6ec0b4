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
from typing import Any

import torch
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
