"""The feature database: one streaming pass of a run's coder over a store into RUN/features.sqlite (stdlib
sqlite3; its schema and queries in feature_db.py, its final step in feature_final.py).

Per atom (or code): firing count, density, mean and max activation, a fixed-bin histogram, its top-N rows,
samples across its activation quantiles, a token window around each with the atom's activation on every token,
its nearest atoms by decoder cosine, its most co-firing atoms and, for causal LMs, its logit effect (atom · W_U).
Readings chosen:
- top-N: the N largest activations per atom, ties to the earlier row, merged chunk by chunk into [m, N] tensors;
  no [tokens, m] matrix is ever formed.
- quantile samples: a uniform reservoir of R firings per atom (a random key per firing, the R smallest kept),
  sorted by activation, `samples` evenly spaced order statistics kept (the top one is the reservoir's maximum).
- co-firing: P(g fires | f fires) estimated on f's reservoir rows (a uniform sample of R rows where f fires),
  with its lift P(g | f) / P(g); the atoms most often active with f there are kept.
- codebooks (one code per token, weight 1): a row's activation for ranking is the cosine between the token's
  activation and the code's vector (how typical the token is of the code); the histogram is of that cosine.
  Codes of several slots of weight 1 (rvq's stages) rank by that weight: all tie, and ties go to the earliest rows.
- resumable: the pass appends each row's code (CSR) to features-codes.tmp and saves its running state to
  features-progress.tmp every `save_every` seconds; a rerun with the same settings continues from the last save.
  The database is written as features.sqlite.tmp and renamed at the end; the .tmp files are then removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from .code import Code
from .config import check, derive_seed, positive
from .errors import SparsecodeError
from .feature_db import (
    CODES,
    COS_EDGES,
    INDPTR,
    LOG_EDGES,
    PROGRESS,
    VERSION,
)
from .feature_final import finalize, read_rows
from .files import failpoint


@dataclass
class FeatureConfig:
    """What the pass keeps per atom; `tokens` = the store's first N rows (None: all)."""

    tokens: int | None = None
    top: int = 16  # top activating rows per atom
    reservoir: int = 32  # uniform sample of firings per atom (quantile samples and co-firing)
    samples: int = 8  # quantile samples shown, out of the reservoir
    before: int = 10  # tokens of context before the firing token
    after: int = 3  # and after it
    neighbours: int = 8  # nearest atoms by decoder cosine
    cofiring: int = 8
    logits: int = 10  # top boosted and suppressed tokens (causal LMs)
    chunk_rows: int = 8192
    save_every: float = 30.0  # seconds between progress saves
    seed: int = 0

    def validate(self) -> None:
        for name in ("top", "reservoir", "samples", "chunk_rows"):
            positive(self, name)
        check(self.tokens is None or self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        check(self.samples <= self.reservoir, "samples must be at most reservoir")
        check(self.before >= 0 and self.after >= 0, "the context window must not be negative")
        check(min(self.neighbours, self.cofiring, self.logits) >= 0, "neighbours, cofiring, logits must be >= 0")


# --- reading the store in contiguous blocks (pread: the pass's memory stays flat, no pages stay mapped) ----------
def acts_tensor(store: Any, raw: np.ndarray) -> Tensor:
    t = torch.from_numpy(raw)
    return (t.view(torch.bfloat16) if store.dtype == "bf16" else t).float()


# --- the running state of the pass -------------------------------------------------------------------------------
def merge_best(key: Tensor, payload: list[Tensor], f: Tensor, k: Tensor, p: list[Tensor]) -> None:
    """Keep per feature (a row of key [m, N], by decreasing key) the N largest keys of the kept entries and the
    candidates (feature f, key k, payloads p); ties go to what came first: kept entries, then candidates in order."""
    n = key.shape[1]
    fresh = k > key[f, -1]
    if not bool(fresh.any()):
        return
    f, k, p = f[fresh], k[fresh], [x[fresh] for x in p]
    touched = torch.unique(f)
    cf = torch.cat([touched.repeat_interleave(n), f])
    ck = torch.cat([key[touched].flatten(), k])
    cp = [torch.cat([x[touched].flatten(), y]) for x, y in zip(payload, p, strict=True)]
    order = ck.sort(descending=True, stable=True).indices
    order = order[cf[order].sort(stable=True).indices]
    sf = cf[order]
    rank = torch.arange(len(sf)) - torch.searchsorted(sf, sf)
    keep = rank < n
    sel, fi, ri = order[keep], sf[keep], rank[keep]
    key[fi, ri] = ck[sel]
    for x, y in zip(payload, cp, strict=True):
        x[fi, ri] = y[sel]


class Tally:
    """Per-atom counts, sums, max, histogram, top-N rows and reservoir, updated one chunk of rows at a time."""

    def __init__(self, m: int, cfg: FeatureConfig, edges: list[float]):
        self.m, self.cfg = m, cfg
        self.edges = torch.tensor(edges, dtype=torch.float32)
        self.bins = len(edges) + 1
        self.t: dict[str, Tensor] = {
            "count": torch.zeros(m, dtype=torch.long), "sum": torch.zeros(m, dtype=torch.float64),
            "max": torch.full((m,), -math.inf), "hist": torch.zeros(m * self.bins, dtype=torch.long),
            "top_v": torch.full((m, cfg.top), -math.inf), "top_r": torch.full((m, cfg.top), -1, dtype=torch.long),
            "res_k": torch.full((m, cfg.reservoir), -math.inf),
            "res_r": torch.full((m, cfg.reservoir), -1, dtype=torch.long),
            "res_v": torch.zeros((m, cfg.reservoir)),
        }

    def update(self, f: Tensor, s: Tensor, r: Tensor, start: int, log_bins: bool) -> None:
        """Firings of one chunk (row-major): feature f, score s (the activation, or a codebook's cosine), row r."""
        t = self.t
        t["count"].index_add_(0, f, torch.ones_like(f))
        t["sum"].index_add_(0, f, s.double())
        t["max"].scatter_reduce_(0, f, s, "amax")
        x = s.abs().clamp_min(1e-30).log10() if log_bins else s
        t["hist"].index_add_(0, f * self.bins + torch.bucketize(x, self.edges, right=True), torch.ones_like(f))
        merge_best(t["top_v"], [t["top_r"]], f, s, [r])
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, f"features/{start}"))
        merge_best(t["res_k"], [t["res_r"], t["res_v"]], f, -torch.rand(len(f), generator=g), [r, s])


# --- the pass ----------------------------------------------------------------------------------------------------
def coder_fingerprint(coder: Any) -> str:
    h = hashlib.sha256(coder.name.encode())
    for k, v in sorted(coder.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_store(run: Path, data: str | None):
    """The store to read: --data, else the store the run was trained on."""
    from .data.store import Store
    from .run_config import load_config

    cfg = load_config(run)
    if data is None:
        src = cfg.source
        if src is None or src.kind != "store" or not src.path:
            raise SparsecodeError(f"{run} was not trained on a store (source {src.kind if src else 'memory'}); "
                                  f"pass --data STORE")
        data = src.path
    return Store(data)


def scoring(coder: Any, store: Any) -> str:
    """'cosine' for codebooks (one slot per row, every weight 1), else 'value'."""
    code = encode(coder, acts_tensor(store, read_rows(store, 0, min(store.n, 256), "acts")))
    active = code.active()
    return "cosine" if code.k == 1 and bool((code.values[active] == 1).all()) else "value"


@torch.inference_mode()
def encode(coder: Any, x: Tensor) -> Code:
    device = next(iter(coder.buffers())).device
    code = coder.encode(x.to(device))
    return Code(code.indices.cpu(), code.values.float().cpu(), code.size)


def build_features(run: str | Path, data: str | None = None, cfg: FeatureConfig | None = None,
                   progress: bool = False, device: str = "cpu", say=print) -> Path:
    """Build RUN/features.sqlite over the store (resuming a killed build with the same settings); its path."""
    from .device import pick_device
    from .interop import load_coder

    cfg = cfg or FeatureConfig()
    cfg.validate()
    run = Path(run)
    store = resolve_store(run, data)
    coder = load_coder(run, device=pick_device(device)).eval()
    atoms = coder.atoms().detach().float().cpu()
    m, d = atoms.shape[0], coder.cfg.d_in  # a transcoder's codes read its input (the store's acts) alone
    if store.d != d:
        raise SparsecodeError(f"store {store.path} holds d={store.d} activations but the run reads d_in={d}")
    n = min(cfg.tokens or store.n, store.n)
    score = scoring(coder, store)
    settings = {"version": VERSION, "store": str(Path(store.path).resolve()), "store_tokens": store.n,
                "store_shards": [s["sha256"] for s in store.shards], "rows": n, "coder": coder_fingerprint(coder),
                "score": score, **{k: v for k, v in asdict(cfg).items() if k not in ("tokens", "save_every")}}
    tally = Tally(m, cfg, COS_EDGES if score == "cosine" else LOG_EDGES)
    with build_lock(run):
        start, nnz = resume(run, settings, tally, say)
        rate = _pass(run, store, coder, atoms, tally, settings, cfg, n, start, nnz, progress, score)
        path = finalize(run, store, coder, atoms, tally, cfg, n, score, rate)
        for name in (PROGRESS, CODES, INDPTR):
            (run / name).unlink(missing_ok=True)
    return path


@contextmanager
def build_lock(run: Path) -> Iterator[None]:
    """An exclusive flock on the run folder itself for one builder (the trainer's lock is another file)."""
    fd = os.open(run, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SparsecodeError(f"another process is building the feature database of {run}; wait for it") from None
    try:
        yield
    finally:
        os.close(fd)


def resume(run: Path, settings: dict[str, Any], tally: Tally, say) -> tuple[int, int]:
    """(row, code entries) reached by a killed build with these settings (its state loaded), else (0, 0)."""
    path = run / PROGRESS
    if path.is_file():
        try:
            db = sqlite3.connect(path)
            try:
                saved = dict(db.execute("SELECT key, value FROM progress").fetchall())
            finally:
                db.close()
            present = all((run / name).is_file() for name in (CODES, INDPTR))
            if present and json.loads(saved["settings"]) == settings:
                tensors = load_tensors(saved["tensors"])
                rows, nnz = int(saved["rows"]), int(saved["nnz"])
                if (run / CODES).stat().st_size < nnz * 8 or (run / INDPTR).stat().st_size < rows * 8:
                    raise ValueError("its code files are shorter than its last save")
                if set(tensors) == set(tally.t) and all(tensors[k].shape == v.shape for k, v in tally.t.items()):
                    tally.t = tensors
                    say(f"resuming the feature pass at row {rows}")
                    return rows, nnz
            say("a feature pass with other settings was left here; starting afresh")
        except (sqlite3.Error, KeyError, ValueError, TypeError, SafetensorError) as e:
            say(f"the saved feature pass is unreadable ({e}); starting afresh")
    for name in (PROGRESS, CODES, INDPTR):
        (run / name).unlink(missing_ok=True)
    return 0, 0


def save_progress(run: Path, settings: dict[str, Any], tally: Tally, rows: int, nnz: int, files: list[Any]) -> None:
    """Flush the code files, then record (rows, entries, state) in one transaction: a kill leaves either save."""
    for f in files:
        f.flush()
        os.fsync(f.fileno())
    with sqlite3.connect(run / PROGRESS) as db:
        db.execute("CREATE TABLE IF NOT EXISTS progress(key TEXT PRIMARY KEY, value)")
        db.executemany("INSERT OR REPLACE INTO progress VALUES (?, ?)",
                       [("settings", json.dumps(settings)), ("rows", rows), ("nnz", nnz),
                        ("tensors", save_tensors({k: v.contiguous() for k, v in tally.t.items()}))])
    db.close()
    failpoint("features-saved")


def _pass(run: Path, store: Any, coder: Any, atoms: Tensor, tally: Tally, settings: dict[str, Any],
          cfg: FeatureConfig, n: int, start: int, nnz: int, progress: bool, score: str) -> float:
    """Encode rows [start, n) chunk by chunk, update the tally, append codes; tokens/s of this call (None: no
    rows were left)."""
    from tqdm import tqdm

    unit = torch.nn.functional.normalize(atoms, dim=1) if score == "cosine" else None
    mode = "r+b" if start else "wb"
    bar = tqdm(total=n, initial=start, unit="tok", unit_scale=True, dynamic_ncols=True, disable=not progress,
               desc="features")
    t0, saved, row = time.perf_counter(), time.monotonic(), start
    with open(run / CODES, mode) as codes, open(run / INDPTR, mode) as indptr, bar:
        codes.truncate(nnz * 8)
        indptr.truncate(start * 8)
        codes.seek(nnz * 8)
        indptr.seek(start * 8)
        while row < n:
            hi = min(row + cfg.chunk_rows, n)
            x = acts_tensor(store, read_rows(store, row, hi, "acts"))
            code = encode(coder, x)
            active = code.active()
            rows = torch.arange(row, hi)[:, None].expand_as(active)
            f, v, r = code.indices[active], code.values[active], rows[active]
            if unit is None:
                s = v
            else:
                xr = x[r - row]
                s = (xr * unit[f]).sum(1) / xr.norm(dim=1).clamp_min(1e-12)
            tally.update(f, s, r, row, score == "value")
            codes.write(torch.stack([f.int(), v.view(torch.int32)], 1).numpy().tobytes())
            indptr.write((nnz + active.sum(1).cumsum(0)).numpy().tobytes())
            nnz += len(f)
            bar.update(hi - row)
            row = hi
            if row == n or time.monotonic() - saved >= cfg.save_every:
                save_progress(run, settings, tally, row, nnz, [codes, indptr])
                saved = time.monotonic()
    return (n - start) / max(time.perf_counter() - t0, 1e-9) if n > start else None


# --- the final step: contexts, co-firing, neighbours, logit effects, token text --------------------------------
