"""Activation sources: anything that yields [n, d] float batches repeatably and can resume its position.

Sources are named by a `SourceConfig` (saved in the run's config.json) and opened by kind through a
small registry, so a run can reopen its training stream on resume and its held-out split in `eval`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..config import check, derive_seed
from ..errors import SparsecodeError


@runtime_checkable
class ActivationSource(Protocol):
    """A repeatable stream of activation batches."""

    d: int  # width of each activation row

    def next_batch(self, n: int) -> Tensor:
        """[n, d] float32 rows; the stream goes on for ever (epochs, or fresh samples)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream, enough to resume it exactly."""
        ...

    # optional: `next_shard(n, rank, world)`, rows [rank·n/world, (rank+1)·n/world) of the next n (reading only
    # those); a source without it gives a rank its share of `next_batch(n)`

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class SourceConfig:
    """Where a run's activations come from: `kind` picks the opener, `options` are its arguments."""

    kind: str = "synthetic"
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    heldout: float = 0.05  # share of a finite dataset kept out of training for `eval`
    seed: int = 0

    def validate(self) -> None:
        check(0 <= self.heldout < 1, f"heldout must be in [0, 1), got {self.heldout}")


Opener = Callable[[SourceConfig, str], ActivationSource]


@dataclass
class SourceKind:
    """How to open one kind of source: its opener, the dataclass of its options, and for kinds read from a
    path, which paths are theirs (`claims`) and how to name them."""

    open: Opener
    options: type | None
    claims: Callable[[Path], bool] | None = None
    described: str = ""


SOURCES: dict[str, SourceKind] = {}


def register_source(kind: str, options: type | None = None, claims: Callable[[Path], bool] | None = None,
                    described: str = ""):
    """Decorator: make an opener the source of kind `kind` (`--source kind`, or a path that `claims` accepts)."""
    def wrap(fn: Opener) -> Opener:
        SOURCES[kind] = SourceKind(fn, options, claims, described)
        return fn

    return wrap


def source_kinds() -> dict[str, SourceKind]:
    """Every registered kind of source, by name (the `data` package registers them all when imported)."""
    return dict(sorted(SOURCES.items()))


def source_from_spec(spec: str, options: dict[str, str] | None = None, seed: int = 0) -> SourceConfig:
    """The SourceConfig named by `--source` (a registered kind, or a path one kind claims) and its
    `--source-opt key=value` options, parsed into the kind's option types."""
    from ..config import parse_value

    kinds = source_kinds()
    path = Path(spec)
    if spec in kinds and kinds[spec].claims is None:
        kind, where = spec, None
    else:
        kind = next((k for k, v in kinds.items() if v.claims is not None and v.claims(path)), None)
        if kind is None:
            named = ", ".join(k for k, v in kinds.items() if v.claims is None)
            paths = " or ".join(v.described for v in kinds.values() if v.claims is not None)
            what = f"{path} exists but is not" if path.exists() else f"{spec!r} is neither a source kind ({named}) nor"
            raise SparsecodeError(f"--source: {what} {paths}")
        where = str(path.resolve())
    cls = kinds[kind].options
    if options and cls is None:
        raise SparsecodeError(f"--source-opt does not apply to {kind} sources")
    opts = {k: parse_value(cls, k, v) for k, v in (options or {}).items()}
    return SourceConfig(kind=kind, path=where, options=opts, seed=seed)


def open_source(cfg: SourceConfig, split: str = "train") -> ActivationSource:
    """Open the `train` or `eval` split of a configured source."""
    check(split in ("train", "eval"), f"split must be 'train' or 'eval', got {split!r}")
    source_kinds()
    if cfg.kind == "memory":
        raise SparsecodeError("this run was trained on in-memory data, which cannot be reopened; pass the data")
    if cfg.kind not in SOURCES:
        near = difflib.get_close_matches(cfg.kind, SOURCES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SparsecodeError(f"unknown source kind {cfg.kind!r}{hint}; choose from: {', '.join(sorted(SOURCES))}")
    return SOURCES[cfg.kind].open(cfg, split)


class TensorSource:
    """Shuffled epochs over the rows of a matrix (a tensor, or a memory-mapped .npy array).

    The order is a function of (seed, epoch) alone, so the state is just (epoch, position).
    """

    def __init__(self, data: Tensor | np.ndarray, seed: int = 0, rows: range | None = None):
        check(data.ndim == 2, f"activations must be a 2-D [rows, d] array, got shape {tuple(data.shape)}")
        self.data = data
        self.rows = rows if rows is not None else range(data.shape[0])
        check(len(self.rows) > 0, "the activation source has no rows")
        self.d = int(data.shape[1])
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._perm(0)

    def __len__(self) -> int:
        return len(self.rows)

    def _perm(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, f"epoch{epoch}"))
        return torch.randperm(len(self.rows), generator=g) + self.rows.start

    def _rows(self, idx: Tensor) -> Tensor:
        if isinstance(self.data, Tensor):
            return self.data[idx]
        sorted_idx, back = idx.sort()  # memory-mapped reads go faster in file order
        rows = torch.from_numpy(np.ascontiguousarray(self.data[sorted_idx.numpy()]))
        return rows[back.argsort()]

    def next_batch(self, n: int) -> Tensor:
        return self._rows(self._advance(n)).float()

    def next_shard(self, n: int, rank: int, world: int) -> Tensor:
        """Rows [rank·n/world, (rank+1)·n/world) of the next n (the stream advances by n): one rank's share of a
        global batch, the only rows it reads."""
        return self._rows(self._advance(n)[rank * n // world : (rank + 1) * n // world]).float()

    def _advance(self, n: int) -> Tensor:
        parts, need = [], n
        while need:
            take = self._order[self.pos : self.pos + need]
            parts.append(take)
            need -= take.numel()
            self.pos += take.numel()
            if self.pos == len(self.rows):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._perm(self.epoch)


def split_rows(n: int, heldout: float, split: str) -> range:
    """The training rows come first, the last `heldout` share is the evaluation split."""
    n_eval = int(round(n * heldout))
    if split == "eval":
        check(n_eval > 0, f"no held-out rows: {n} rows with heldout={heldout}")
        return range(n - n_eval, n)
    return range(0, n - n_eval)


@register_source("npy", claims=lambda p: p.suffix == ".npy", described="a .npy file")
def open_npy(cfg: SourceConfig, split: str) -> TensorSource:
    """A .npy file of [rows, d] activations, memory-mapped."""
    check(cfg.path is not None, "source kind 'npy' needs a path")
    path = Path(cfg.path)
    if not path.is_file():
        raise SparsecodeError(f"activation file not found: {path}")
    try:
        data = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise SparsecodeError(f"cannot read {path} as a .npy array: {e}") from None
    check(np.issubdtype(data.dtype, np.floating), f"{path}: expected a float array, got dtype {data.dtype}")
    check(data.ndim == 2, f"{path}: expected a 2-D [rows, d] array, got shape {data.shape}")
    return TensorSource(data, cfg.seed, split_rows(data.shape[0], cfg.heldout, split))


def source_sites(source: ActivationSource, want: int | None) -> int | None:
    """A crosscoder's `sites` from a source of several (`site_widths`, e.g. a store harvested with several hooks):
    their number, checked against `want` (None: not set). sites=1 codes their concatenation as one site."""
    widths = tuple(getattr(source, "site_widths", ()) or ())
    if len(widths) < 2 or want == 1:
        return None
    check(len(set(widths)) == 1, f"a crosscoder needs sites of one width, but the source's sites are "
                                 f"{', '.join(map(str, widths))} wide (no projection to one width); set sites=1 to "
                                 f"code their concatenation as one site")
    check(want in (None, len(widths)), f"the source has {len(widths)} sites but the run expects sites={want}")
    return len(widths)
