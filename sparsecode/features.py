"""The feature database: one streaming pass of a run's coder over a store into RUN/features.sqlite (stdlib
sqlite3), and the queries `sparsecode browse` pages read.

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

import argparse
import fcntl
import hashlib
import json
import math
import mmap
import os
import sqlite3
import threading
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
from .files import failpoint

DB, PARTIAL, PROGRESS = "features.sqlite", "features.sqlite.tmp", "features-progress.tmp"
CODES, INDPTR = "features-codes.tmp", "features-indptr.tmp"
VERSION = 1
LOG_EDGES = [round(-3 + 0.1 * i, 1) for i in range(61)]  # log10 |activation| bin edges (+ under/overflow bins)
COS_EDGES = [round(-1 + 0.05 * i, 2) for i in range(41)]  # cosine bin edges of codebooks
DENSE = 0.1  # an atom active on more than this share of tokens is dense (as in `diagnose`)
LOOKUPS = 1 << 21  # window lookups resolved per group in the final step (bounds its memory)
BLOCK = 1 << 16  # rows read at a time from the code file and the store in the final step


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
def read_rows(store: Any, lo: int, hi: int, key: str) -> np.ndarray:
    """Rows [lo, hi) of one column of the store (acts as stored, bf16 as int16), copied into memory."""
    parts = []
    first = int(np.searchsorted(store.starts, lo, side="right")) - 1
    for i in range(first, len(store.shards)):
        s0 = int(store.starts[i])
        if s0 >= hi:
            break
        a, b = max(lo, s0) - s0, min(hi, int(store.starts[i + 1])) - s0
        parts.append(_slice(store.shard(i)[key], a, b))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _slice(arr: np.ndarray, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of a shard array: read from its file when it is a whole mapped file region, else copied."""
    if isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.filename and arr.flags.c_contiguous:
        row = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
        out = np.empty((b - a, *arr.shape[1:]), arr.dtype)
        with open(arr.filename, "rb") as f:
            f.seek(arr.offset + a * row)
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        return out
    return np.array(arr[a:b])


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
    from .train import load_config

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
    m, d = atoms.shape
    if store.d != d:
        raise SparsecodeError(f"store {store.path} holds d={store.d} activations but the run's atoms have d={d}")
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
class CodeFile:
    """The pass's codes (CSR over rows): each row's active (feature, value) pairs, read in row blocks."""

    def __init__(self, run: Path, n: int):
        self.codes, self.indptr, self.n = run / CODES, run / INDPTR, n

    def block(self, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
        """(ends [hi-lo] relative to the block's first entry, features, values) of rows [lo, hi)."""
        ends = np.fromfile(self.indptr, np.int64, count=hi - lo + (lo > 0), offset=(lo - (lo > 0)) * 8)
        first = int(ends[0]) if lo > 0 else 0
        ends = ends[1:] if lo > 0 else ends
        pairs = np.fromfile(self.codes, np.int32, count=2 * (int(ends[-1]) - first), offset=first * 8).reshape(-1, 2)
        return (torch.from_numpy(ends - first), torch.from_numpy(pairs[:, 0].astype(np.int64)),
                torch.from_numpy(pairs[:, 1].copy()).view(torch.float32))


    def keyed(self, lo: int, hi: int, m: int) -> tuple[Tensor, Tensor]:
        """(sorted keys (row - lo) * m + feature, their values) of the code entries of rows [lo, hi)."""
        ends, f, v = self.block(lo, hi)
        sizes = ends - torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])
        keys, order = (torch.repeat_interleave(torch.arange(hi - lo), sizes) * m + f).sort()
        return keys, v[order]


def blocks(rows: Tensor, n: int):
    """(lo, hi, index range into sorted `rows`) of every BLOCK of rows [0, n) that holds some of them."""
    for lo in range(0, n, BLOCK):
        a, b = (int(i) for i in torch.searchsorted(rows, torch.tensor([lo, min(lo + BLOCK, n)])))
        if a < b:
            yield lo, min(lo + BLOCK, n), a, b


def segments(ends: Tensor, local: Tensor) -> tuple[Tensor, Tensor]:
    """(owner, entry index) of every code entry of rows `local` (block-relative) given the block's ends."""
    begin = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])[local]
    size = ends[local] - begin
    owner = torch.repeat_interleave(torch.arange(len(local)), size)
    offset = torch.arange(len(owner)) - torch.repeat_interleave(size.cumsum(0) - size, size)
    return owner, begin[owner] + offset


def windows(store: Any, codes: CodeFile, feat: Tensor, center: Tensor, cfg: FeatureConfig, n: int, m: int):
    """Per sample (feature, center row): the window's token ids [S, W] (-1 outside its document) and the
    feature's activation on each token [S, W], read from the store and the pass's code file (a sorted-key
    join per block of rows: (row, feature) -> value)."""
    offs = torch.arange(-cfg.before, cfg.after + 1)
    w = len(offs)
    rows_all = center[:, None] + offs
    toks, acts = torch.full((len(center), w), -1, dtype=torch.int32), torch.zeros(len(center), w)
    per = max(1, LOOKUPS // w)
    for g0 in range(0, len(center), per):
        rows = rows_all[g0 : g0 + per].clamp(0, n - 1).flatten()
        fs = feat[g0 : g0 + per, None].expand(-1, w).flatten()
        order = rows.argsort()
        srows, sfs = rows[order], fs[order]
        tok, doc, pos = (torch.zeros(len(rows), dtype=torch.long) for _ in range(3))
        act = torch.zeros(len(rows))
        for lo, hi, a, b in blocks(srows, n):
            local = srows[a:b] - lo
            for key, out in (("tokens", tok), ("doc", doc), ("pos", pos)):
                out[a:b] = torch.from_numpy(read_rows(store, lo, hi, key).astype(np.int64))[local]
            keys, v = codes.keyed(lo, hi, m)
            want = local * m + sfs[a:b]
            at = torch.searchsorted(keys, want).clamp_max(len(keys) - 1)
            act[a:b] = torch.where(keys[at] == want, v[at], 0.0) if len(keys) else 0.0
        unsort = torch.empty_like(order)
        unsort[order] = torch.arange(len(order))
        tok, doc, pos, act = (t[unsort].view(-1, w) for t in (tok, doc, pos, act))
        raw = rows_all[g0 : g0 + per]
        c = cfg.before
        ok = (raw >= 0) & (raw < n) & (doc == doc[:, c : c + 1]) & (pos - pos[:, c : c + 1] == offs)
        toks[g0 : g0 + per] = tok.masked_fill(~ok, -1).int()
        acts[g0 : g0 + per] = act.masked_fill(~ok, 0)
    return toks, acts


def cofiring(codes: CodeFile, t: dict[str, Tensor], density: Tensor, top: int, n: int) -> list[tuple]:
    """(feature, rank, other, share, lift): the atoms most often active on f's reservoir rows (share = P(g | f))."""
    m, r = t["res_r"].shape
    out: list[tuple] = []
    if top == 0:
        return out
    per = max(1, LOOKUPS // (r * 8))
    for f0 in range(0, m, per):
        rr = t["res_r"][f0 : f0 + per]
        valid = rr >= 0
        feats = torch.arange(f0, f0 + len(rr))[:, None].expand_as(rr)[valid]
        rows = rr[valid]
        order = rows.argsort()
        srows, sfeat = rows[order], feats[order]
        keys = []
        for lo, hi, a, b in blocks(srows, n):
            ends, f, _ = codes.block(lo, hi)
            owner, entry = segments(ends, srows[a:b] - lo)
            mine, other = sfeat[a:b][owner], f[entry]
            keys.append((mine * m + other)[mine != other])
        if not keys:
            continue
        pairs, counts = torch.unique(torch.cat(keys), return_counts=True)
        fa, fb = pairs // m, pairs % m
        order = counts.sort(descending=True, stable=True).indices
        order = order[fa[order].sort(stable=True).indices]
        sa = fa[order]
        rank = torch.arange(len(sa)) - torch.searchsorted(sa, sa)
        keep = order[rank < top]
        sizes = valid.sum(1)
        share = counts[keep].double() / sizes[fa[keep] - f0].double()
        lift = share / density[fb[keep]].double().clamp_min(1e-12)
        out += list(zip(fa[keep].tolist(), rank[rank < top].tolist(), fb[keep].tolist(), share.tolist(),
                        lift.tolist(), strict=True))
    return out


def neighbours(atoms: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """([m, top] indices, cosines) of each atom's nearest other atoms by cosine, by chunked matmul."""
    unit = torch.nn.functional.normalize(atoms, dim=1)
    m = len(unit)
    chunk = max(1, (1 << 25) // m)  # [chunk, m] similarities: 128 MiB at most
    top = min(top, m - 1)
    idx, cos = torch.zeros(m, top, dtype=torch.long), torch.zeros(m, top)
    for a in range(0, m, chunk):
        sims = unit[a : a + chunk] @ unit.T
        sims[torch.arange(len(sims)), torch.arange(a, a + len(sims))] = -math.inf
        c, i = sims.topk(top, dim=1)
        idx[a : a + chunk], cos[a : a + chunk] = i, c
    return idx, cos


def logit_effects(atoms: Tensor, model: Any, top: int) -> list[tuple] | None:
    """(feature, sign, rank, token, value): the tokens each atom most boosts (+1) and suppresses (-1) through
    the unembedding, atom · W_U; None when the model has no LM head of the atoms' width."""
    from .splice import is_causal_lm

    if model is None or top == 0 or not is_causal_lm(model):
        return None
    w = model.get_output_embeddings().weight.detach().float().cpu()
    if w.shape[1] != atoms.shape[1]:
        return None
    out = []
    top = min(top, w.shape[0])
    chunk = max(1, (1 << 25) // w.shape[0])  # [chunk, vocabulary] logits: 128 MiB at most
    for a in range(0, len(atoms), chunk):
        logits = atoms[a : a + chunk] @ w.T
        for sign in (1, -1):
            v, i = (sign * logits).topk(top, dim=1)
            for j in range(len(v)):
                out += [(a + j, sign, r, t, sign * x) for r, (t, x) in enumerate(zip(i[j].tolist(), v[j].tolist(),
                                                                                     strict=True))]
    return out


def quantile_samples(t: dict[str, Tensor], samples: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(feature, rank, row, value, quantile) of `samples` evenly spaced order statistics of each reservoir."""
    v = t["res_v"].masked_fill(t["res_r"] < 0, -math.inf)
    order = v.sort(1, descending=True).indices
    rows, vals = t["res_r"].gather(1, order), v.gather(1, order)
    cnt = (t["res_r"] >= 0).sum(1)
    j = torch.arange(samples)
    pos = (j[None, :] * (cnt[:, None] - 1).clamp_min(0) / max(samples - 1, 1)).round().long()
    keep = (cnt[:, None] > 0) & torch.cat([torch.ones(len(pos), 1, dtype=torch.bool), pos[:, 1:] != pos[:, :-1]], 1)
    feat = torch.arange(len(pos))[:, None].expand_as(pos)
    quant = 1 - pos.double() / (cnt[:, None] - 1).clamp_min(1).double()
    return (feat[keep], j[None].expand_as(pos)[keep], rows.gather(1, pos)[keep], vals.gather(1, pos)[keep],
            quant[keep])


def text_model(man: dict[str, Any]) -> tuple[Any, Any]:
    """(the store's model if it is a causal LM, else None; its tokenizer): token text and the unembedding."""
    from .model import load_model, load_tokenizer, model_path

    path = model_path(man["model"])
    local = Path(path).is_dir()
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=local, **({} if local else
                                                                            {"revision": man.get("revision")}))
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
    except (OSError, ValueError, KeyError, ImportError):
        causal = True  # let load_model say what is wrong
    if causal:
        return load_model(man["model"], man.get("revision"), "cpu", man.get("tokenizer"))[:2]
    offline = local or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    tok = man.get("tokenizer")
    return None, load_tokenizer(tok or path, offline, None if tok else man.get("revision"))


def finalize(run: Path, store: Any, coder: Any, atoms: Tensor, tally: Tally, cfg: FeatureConfig, n: int,
             score: str, rate: float | None) -> Path:
    """Write every table into features.sqlite.tmp and rename it to features.sqlite."""
    t = tally.t
    m = len(atoms)
    count = t["count"]
    density = count.double() / n
    model, tokenizer = text_model(store.manifest)
    codes = CodeFile(run, n)
    # contexts: top rows, then the quantile samples
    valid = t["top_r"] >= 0
    tf = torch.arange(m)[:, None].expand_as(valid)[valid]
    trank = torch.arange(cfg.top)[None].expand_as(valid)[valid]
    qf, qrank, qrow, qval, quant = quantile_samples(t, cfg.samples)
    feat = torch.cat([tf, qf])
    center = torch.cat([t["top_r"][valid], qrow])
    value = torch.cat([t["top_v"][valid], qval])
    kind = ["top"] * len(tf) + ["sample"] * len(qf)
    rank = torch.cat([trank, qrank])
    quantile = [None] * len(tf) + quant.tolist()
    toks, acts = windows(store, codes, feat, center, cfg, n, m)
    nb_idx, nb_cos = neighbours(atoms, cfg.neighbours) if cfg.neighbours and m > 1 else (None, None)
    logits = logit_effects(atoms, model, cfg.logits)
    co = cofiring(codes, t, density, cfg.cofiring, n)
    # token text: every token shown in a window or a logit list
    c = cfg.before
    logit_ids = torch.tensor([x[3] for x in logits or []], dtype=torch.long)
    ids = torch.unique(torch.cat([toks[toks >= 0].long(), logit_ids]))
    vocab = [(i, tokenizer.decode([i])) for i in ids.tolist()]
    # search index: the token each stored context fires on, per feature
    hits_key = toks[:, c].long() * m + feat
    keys, hits = torch.unique(hits_key[toks[:, c] >= 0], return_counts=True)
    best = torch.full((len(keys),), -math.inf)
    pos = torch.searchsorted(keys, hits_key[toks[:, c] >= 0])
    best.scatter_reduce_(0, pos, value[toks[:, c] >= 0].float(), "amax")
    texts = dict(vocab)
    tokens_of: dict[int, list[tuple[int, str]]] = {}
    for key, h in zip(keys.tolist(), hits.tolist(), strict=True):
        tokens_of.setdefault(key % m, []).append((h, texts[key // m]))
    hist = t["hist"].view(m, -1)
    path = run / PARTIAL
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA)
        mean = (t["sum"] / count.clamp_min(1)).tolist()
        db.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?)", (
            (f, cnt, dens, mean[f] if cnt else None, mx if cnt else None, json.dumps(h),
             json.dumps([s for _, s in sorted(tokens_of.get(f, []), key=lambda x: -x[0])[:3]]))
            for f, (cnt, dens, mx, h) in enumerate(zip(count.tolist(), density.tolist(), t["max"].tolist(),
                                                        hist.tolist(), strict=True))))
        db.executemany("INSERT INTO contexts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (
            (f, k, r, row, v, q, c, tk.astype(np.int32).tobytes(), ac.astype(np.float32).tobytes())
            for f, k, r, row, v, q, tk, ac in zip(feat.tolist(), kind, rank.tolist(), center.tolist(),
                                                  value.tolist(), quantile, toks.numpy(), acts.numpy(), strict=True)))
        db.executemany("INSERT INTO vocab VALUES (?, ?, ?)", ((i, s, s.strip().lower()) for i, s in vocab))
        db.executemany("INSERT INTO feature_tokens VALUES (?, ?, ?, ?)",
                       zip((keys // m).tolist(), (keys % m).tolist(), hits.tolist(), best.tolist(), strict=True))
        if nb_idx is not None:
            db.executemany("INSERT INTO neighbours VALUES (?, ?, ?, ?)", (
                (f, r, o, cs) for f, (os_, cs_) in enumerate(zip(nb_idx.tolist(), nb_cos.tolist(), strict=True))
                for r, (o, cs) in enumerate(zip(os_, cs_, strict=True))))
        db.executemany("INSERT INTO cofiring VALUES (?, ?, ?, ?, ?)", co)
        db.executemany("INSERT INTO logits VALUES (?, ?, ?, ?, ?)", logits or [])
        db.execute("CREATE INDEX features_density ON features(density)")
        db.execute("CREATE INDEX features_max ON features(max)")
        db.execute("CREATE INDEX features_count ON features(count)")
        for stmt in INDEXES:
            db.execute(stmt)
        meta = run_meta(run, store, coder, atoms, cfg, n, score, rate, logits is not None, density, tokenizer)
        db.executemany("INSERT INTO meta VALUES (?, ?)", ((k, json.dumps(v)) for k, v in meta.items()))
        db.commit()
    finally:
        db.close()
    os.replace(path, run / DB)
    return run / DB


SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE features(id INTEGER PRIMARY KEY, count INTEGER, density REAL, mean REAL, max REAL, hist TEXT,
                      tokens TEXT);
CREATE TABLE contexts(feature INTEGER, kind TEXT, rank INTEGER, row INTEGER, value REAL, quantile REAL,
                      center INTEGER, tokens BLOB, acts BLOB);
CREATE TABLE vocab(id INTEGER PRIMARY KEY, text TEXT, norm TEXT);
CREATE TABLE feature_tokens(token INTEGER, feature INTEGER, hits INTEGER, max REAL);
CREATE TABLE neighbours(feature INTEGER, rank INTEGER, other INTEGER, cos REAL);
CREATE TABLE cofiring(feature INTEGER, rank INTEGER, other INTEGER, share REAL, lift REAL);
CREATE TABLE logits(feature INTEGER, sign INTEGER, rank INTEGER, token INTEGER, value REAL);
"""
INDEXES = ["CREATE INDEX contexts_feature ON contexts(feature, kind, rank)",
           "CREATE INDEX vocab_norm ON vocab(norm)",
           "CREATE INDEX feature_tokens_token ON feature_tokens(token, hits)",
           "CREATE INDEX neighbours_feature ON neighbours(feature, rank)",
           "CREATE INDEX cofiring_feature ON cofiring(feature, rank)",
           "CREATE INDEX logits_feature ON logits(feature, sign, rank)"]


def run_meta(run: Path, store: Any, coder: Any, atoms: Tensor, cfg: FeatureConfig, n: int, score: str,
             rate: float | None, logits: bool, density: Tensor, tokenizer: Any) -> dict[str, Any]:
    """What the overview shows: the run, the store, the pass and the frequency histogram."""
    from .train import load_config

    man = store.manifest
    edges = [-7.0 + 0.35 * i for i in range(21)]
    fired = density[density > 0].log10().clamp(-7, 0)
    freq = torch.histc(fired.float(), bins=20, min=-7, max=0).long().tolist() if len(fired) else [0] * 20
    tcfg = load_config(run)
    return {"run": str(run.resolve()), "store": str(Path(store.path).resolve()), "rows": n,
            "method": coder.name, "m": len(atoms), "d": atoms.shape[1], "k": getattr(coder.cfg, "k", None),
            "coder": coder.config_dict(), "train": {"steps": tcfg.steps, "batch_size": tcfg.batch_size,
                                                    "lr": tcfg.lr, "seed": tcfg.seed},
            "model": man.get("model"), "revision": man.get("revision"), "tokenizer": man.get("tokenizer"),
            "hook": man.get("hook"), "hook_point": man.get("hook_point", "output"), "corpus": man.get("corpus"),
            "context": man.get("context"), "prepend_bos": man.get("prepend_bos", True),
            "score": score, "codebook": score == "cosine", "logits": logits,
            "hist_edges": COS_EDGES if score == "cosine" else LOG_EDGES, "hist_log": score != "cosine",
            "freq_edges": edges, "freq_counts": freq, "dead": int((density == 0).sum()),
            "dense": int((density > DENSE).sum()), "settings": asdict(cfg), "tokens_per_s": rate,
            "built": time.strftime("%Y-%m-%d %H:%M:%S"), "bos": tokenizer.bos_token_id}


# --- queries (what the browser's pages read) ---------------------------------------------------------------------
SORTS = {"id": "id", "density": "density", "max": "max", "mean": "mean", "count": "count"}


class FeatureDB:
    """Read-only access to RUN/features.sqlite, one connection per thread."""

    def __init__(self, run: str | Path):
        self.run = Path(run)
        self.path = self.run / DB
        if not self.path.is_file():
            raise SparsecodeError(f"{self.path} not found; build it with `sparsecode features {self.run}`")
        self._local = threading.local()
        try:
            self.meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        except sqlite3.Error as e:
            raise SparsecodeError(f"{self.path} is not a feature database: {e}") from None

    @property
    def db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        return db

    def texts(self, ids: set[int]) -> dict[int, str]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return dict(self.db.execute(f"SELECT id, text FROM vocab WHERE id IN ({marks})", list(ids)))

    def overview(self, limit: int = 200) -> dict[str, Any]:
        dead = [r[0] for r in self.db.execute("SELECT id FROM features WHERE count = 0 ORDER BY id LIMIT ?",
                                              (limit,))]
        dense = self.db.execute("SELECT id, density FROM features WHERE density > ? ORDER BY density DESC LIMIT ?",
                                (DENSE, limit)).fetchall()
        return {"dead": dead, "dense": dense}

    def search(self, text: str) -> list[int]:
        """Token ids whose text matches `text` (case and surrounding spaces ignored), else those it prefixes."""
        norm = text.strip().lower()
        if not norm:
            return []
        ids = [r[0] for r in self.db.execute("SELECT id FROM vocab WHERE norm = ?", (norm,))]
        return ids or [r[0] for r in self.db.execute(
            "SELECT id FROM vocab WHERE norm >= ? AND norm < ? LIMIT 200", (norm, norm + "\U0010ffff"))]

    def features(self, sort: str = "density", desc: bool = True, q: str = "", min_density: float | None = None,
                 max_density: float | None = None, min_max: float | None = None, max_max: float | None = None,
                 offset: int = 0, limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        """A page of the feature list and how many features pass the filters; with a token search `q` only the
        features whose stored contexts fire on a matching token, `hits` = how many of them do (sort "hits")."""
        where, args, join, hits = [], [], "", "0"
        for col, op, val in (("density", ">=", min_density), ("density", "<=", max_density), ("max", ">=", min_max),
                             ("max", "<=", max_max)):
            if val is not None:
                where.append(f"f.{col} {op} ?")
                args.append(val)
        if q.strip():
            ids = self.search(q)
            join = (f"JOIN (SELECT feature, SUM(hits) AS hits FROM feature_tokens WHERE token IN "
                    f"({','.join('?' * len(ids)) or 'NULL'}) GROUP BY feature) t ON t.feature = f.id")
            args, hits = ids + args, "t.hits"
        key = hits if sort == "hits" and join else f"f.{SORTS.get(sort, 'density')}"
        order = f"{key} {'DESC' if desc else 'ASC'}, f.id"
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        total = self.db.execute(f"SELECT COUNT(*) FROM features f {join} {cond}", args).fetchone()[0]
        rows = self.db.execute(f"SELECT f.id, f.count, f.density, f.mean, f.max, f.tokens, {hits} FROM features f "
                               f"{join} {cond} ORDER BY {order} LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
        out = [{"id": r[0], "count": r[1], "density": r[2], "mean": r[3], "max": r[4], "tokens": json.loads(r[5]),
                "hits": r[6]} for r in rows]
        return out, total

    def feature(self, f: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT id, count, density, mean, max, hist, tokens FROM features WHERE id = ?",
                              (f,)).fetchone()
        if row is None:
            return None
        out = {"id": row[0], "count": row[1], "density": row[2], "mean": row[3], "max": row[4],
               "hist": json.loads(row[5]), "tokens": json.loads(row[6])}
        ctx = self.db.execute("SELECT kind, rank, row, value, quantile, center, tokens, acts FROM contexts "
                              "WHERE feature = ? ORDER BY kind DESC, rank", (f,)).fetchall()
        parsed = [(k, r, row_, v, q, c, np.frombuffer(t, np.int32), np.frombuffer(a, np.float32))
                  for k, r, row_, v, q, c, t, a in ctx]
        logits = self.db.execute("SELECT sign, token, value FROM logits WHERE feature = ? ORDER BY sign DESC, rank",
                                 (f,)).fetchall()
        ids = {int(t) for *_, toks, _ in parsed for t in toks if t >= 0} | {t for _, t, _ in logits}
        text = self.texts(ids)
        peak = max((float(a.max()) for *_, a in parsed if len(a)), default=0.0)
        out["contexts"] = {"top": [], "sample": []}
        for k, _, row_, v, q, c, toks, acts in parsed:
            cells = [{"text": text.get(int(t), ""), "act": float(a), "center": i == c,
                      "alpha": min(1.0, max(0.0, float(a) / peak)) if peak > 0 else 0.0}
                     for i, (t, a) in enumerate(zip(toks, acts, strict=True)) if t >= 0]
            out["contexts"][k].append({"row": row_, "value": v, "quantile": q, "tokens": cells})
        out["boosted"] = [(text.get(t, ""), v) for s, t, v in logits if s > 0]
        out["suppressed"] = [(text.get(t, ""), v) for s, t, v in logits if s < 0]
        out["neighbours"] = self.db.execute(
            "SELECT n.other, n.cos, f.density FROM neighbours n JOIN features f ON f.id = n.other "
            "WHERE n.feature = ? ORDER BY n.rank", (f,)).fetchall()
        out["cofiring"] = self.db.execute(
            "SELECT other, share, lift FROM cofiring WHERE feature = ? ORDER BY rank", (f,)).fetchall()
        return out


# --- the command line ------------------------------------------------------------------------------------------
def add_feature_commands(sub: Any) -> None:
    """Add `sparsecode features` (build the database) and `sparsecode browse` (serve it) to the CLI."""
    d = FeatureConfig()
    f = sub.add_parser("features", help="build RUN/features.sqlite: one pass over a store, per-atom statistics "
                                        "and contexts (resumable)")
    f.add_argument("run")
    f.add_argument("--data", help="the store to read (default: the store the run was trained on)")
    f.add_argument("--tokens", type=lambda s: int(float(s)), help="the store's first N tokens (default all)")
    f.add_argument("--top", type=int, default=d.top, help=f"top activating contexts per atom (default {d.top})")
    f.add_argument("--reservoir", type=int, default=d.reservoir,
                   help=f"firings sampled per atom for quantile samples and co-firing (default {d.reservoir})")
    f.add_argument("--samples", type=int, default=d.samples, help=f"quantile samples kept (default {d.samples})")
    f.add_argument("--chunk-rows", type=int, default=d.chunk_rows, help=f"rows encoded at once (default "
                                                                        f"{d.chunk_rows})")
    f.add_argument("--save-every", type=float, default=d.save_every,
                   help=f"seconds between progress saves (default {d.save_every:g})")
    f.add_argument("--device", default="cpu", help="cpu (default) | auto | cuda[:N]")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(fn=cmd_features)

    b = sub.add_parser("browse", help="explore RUN/features.sqlite in a local web app")
    b.add_argument("run")
    b.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    b.add_argument("--port", type=int, default=8000, help="default 8000 (0: any free port)")
    b.add_argument("--device", default="cpu", help="where the try-it box runs the model: cpu (default) | auto")
    b.set_defaults(fn=cmd_browse)


def cmd_features(a: argparse.Namespace) -> int:
    cfg = FeatureConfig(tokens=a.tokens, top=a.top, reservoir=a.reservoir, samples=min(a.samples, a.reservoir),
                        chunk_rows=a.chunk_rows, save_every=a.save_every)
    path = build_features(a.run, a.data, cfg, progress=not a.no_progress, device=a.device)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    db.close()
    rate = f" ({meta['tokens_per_s']:.0f} tokens/s)" if meta["tokens_per_s"] else ""
    print(f"{meta['m']} {'codes' if meta['codebook'] else 'atoms'} over {meta['rows']} tokens{rate}: "
          f"{meta['dead']} never fired, {meta['dense']} dense")
    print(f"feature database written to {path}; explore it with `sparsecode browse {a.run}`")
    return 0


def cmd_browse(a: argparse.Namespace) -> int:
    from .browse import serve

    serve(a.run, a.host, a.port, a.device)
    return 0
