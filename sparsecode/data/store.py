"""The sharded activation store: a folder of shards plus `manifest.json`, and its shuffled reader.

Each shard holds `rows` consecutive harvested tokens: `acts` [rows, d] (fp16, bf16 or fp32), `tokens`
(token ids), `doc` (document index in the corpus) and `pos` (token offset in that document). The format
is one `shard-NNNNN.safetensors`, or `shard-NNNNN.npy` (acts; bf16 kept as raw uint16) plus
`shard-NNNNN.meta.npy` ([rows, 3] int64: token, doc, pos). A paired store (harvest --target) also holds
`target` [rows, d_out] (a second site's rows, aligned with acts; `shard-NNNNN.target.npy`), and its
manifest `d_out`; its source gives [acts, target] rows, d + d_out wide, for transcoders. A store of several sites
(harvest with several --hook) holds them side by side in `acts`, its manifest's `sites` listing each (module,
point, width) in order; its source's `site_widths` tell a crosscoder where one site ends. Shards are written
atomically before the manifest that lists them (with their sha256); the manifest also keeps where to resume the harvest.

The reader maps shards into memory and checks each shard's sha256 the first time it opens it. An epoch
visits every row of its split once: the split is cut into chunks of `chunk_rows` consecutive rows, the
chunks are shuffled, and each run of `buffer_rows // chunk_rows` chunks (the shuffle buffer) is read in
a uniformly shuffled order. Both shuffles are functions of (seed, epoch, window), so the reader's state is
just (epoch, position) and resuming is exact.
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..config import check, derive_seed, from_dict, positive
from ..errors import SparsecodeError
from ..files import (
    atomic_write,
    atomic_write_json,
    failpoint,
    only_lock_left,
    read_json,
    sha256,
    sweep_temps,
    verify_files,
)
from .source import SourceConfig, register_source, split_rows

MANIFEST, VERSION = "manifest.json", "sparsecode-store/1"
_PART = re.compile(r"rank-(\d+)-of-(\d+)")  # a rank's subfolder in a store harvested by several (`part_name`)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("safetensors", "npy")
_ST_DTYPES = {"F16": np.float16, "BF16": np.int16, "F32": np.float32, "I32": np.int32, "I64": np.int64}


# --- writing --------------------------------------------------------------------------------------
class StoreWriter:
    """Appends rows to a store, one full shard at a time; reopening a partial store resumes it."""

    def __init__(self, path: Path, header: dict[str, Any], shard_tokens: int):
        self.path, self.shard_tokens = Path(path), shard_tokens
        self.dtype, self.format = header["dtype"], header["file_format"]
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.format in FORMATS, f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        self.pending: list[dict[str, Tensor]] = []
        manifest_path = self.path / MANIFEST
        if manifest_path.is_file():
            self.manifest = read_json(manifest_path)
            changed = [k for k in header if self.manifest.get(k) != header[k]]
            if changed:
                raise SparsecodeError(f"store {self.path} was harvested with other settings "
                                      f"({', '.join(changed)} differ); pick a new --out")
            check_manifest(self.path, self.manifest)
            for shard in self.manifest["shards"]:
                verify_shard(self.path, shard)
            sweep_temps(self.path)  # left by a harvest killed mid-write
        else:  # a new store, or one whose harvest was killed before its first manifest: start it afresh
            check_store_folder(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            sweep_temps(self.path)
            self.manifest = {"version": VERSION, **header, "d": None, "complete": False, "tokens": 0,
                             "shards": [], "resume": None}
            atomic_write_json(manifest_path, self.manifest)

    @property
    def rows(self) -> int:
        """Rows safely in shards (rows pending in memory are not counted)."""
        return int(self.manifest["tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def add(self, rows: dict[str, Tensor], resume: dict[str, Any]) -> int:
        """Queue rows (acts, tokens, doc, pos); write every full shard; return how many were written.

        `resume` is where to restart the harvest to regenerate any row after the last written shard.
        """
        if len(rows["acts"]):
            self.pending.append(rows)
        written = 0
        while sum(len(p["acts"]) for p in self.pending) >= self.shard_tokens:
            merged = {k: torch.cat([p[k] for p in self.pending]) for k in rows}
            head = {k: v[: self.shard_tokens] for k, v in merged.items()}
            tail = {k: v[self.shard_tokens:] for k, v in merged.items()}
            self.pending = [tail] if len(tail["acts"]) else []
            self._write_shard(head, resume)
            written += 1
        return written

    def finish(self, empty: bool = False) -> dict[str, Any]:
        """Write the last (short) shard and mark the store complete (`empty`: also with no rows, a rank's part)."""
        if self.pending:
            merged = {k: torch.cat([p[k] for p in self.pending]) for k in self.pending[0]}
            self.pending = []
            self._write_shard(merged, None)
        check(empty or self.rows > 0, f"the harvest into {self.path} produced no tokens")
        self.manifest.update(complete=True, resume=None)
        atomic_write_json(self.path / MANIFEST, self.manifest)
        return self.manifest

    def _write_shard(self, rows: dict[str, Tensor], resume: dict[str, Any] | None) -> None:
        m = self.manifest
        name = f"shard-{len(m['shards']):05d}"
        acts = rows["acts"].to(DTYPES[self.dtype]).contiguous()
        target = {"target": rows["target"].to(DTYPES[self.dtype]).contiguous()} if "target" in rows else {}
        meta = {k: rows[k].to(torch.int32 if k == "tokens" else torch.int64).contiguous()
                for k in ("tokens", "doc", "pos")}
        if self.format == "safetensors":
            files = {f"{name}.safetensors": safetensors_bytes({"acts": acts, **target, **meta})}
        else:
            def raw(t: Tensor) -> Tensor:
                return t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            files = {f"{name}.npy": _npy_bytes(raw(acts).numpy()),
                     f"{name}.meta.npy": _npy_bytes(torch.stack([v.long() for v in meta.values()], 1).numpy()),
                     **{f"{name}.target.npy": _npy_bytes(raw(t).numpy()) for t in target.values()}}
        for fname, data in files.items():
            atomic_write(self.path / fname, data)
        failpoint("shard-written")
        m["shards"].append({"name": name, "rows": len(acts), "sha256": {f: sha256(self.path / f) for f in files}})
        m["d"] = int(acts.shape[1])
        if target:
            m["d_out"] = int(target["target"].shape[1])
        m["tokens"] = m["tokens"] + len(acts)
        m["resume"] = resume
        atomic_write_json(self.path / MANIFEST, m)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def part_name(rank: int, ranks: int) -> str:
    """The subfolder where rank `rank` of a harvest split over `ranks` writes its shards."""
    return f"rank-{rank}-of-{ranks}"


def check_store_folder(path: Path, ranks: int = 1) -> None:
    """Refuse an existing folder that is neither a (partial) store nor left empty by a killed harvest, or that holds
    the parts of a harvest split over another number of ranks than `ranks`."""
    path = Path(path)
    if not path.exists() or (path / MANIFEST).is_file():
        return
    parts = {p.name for p in path.iterdir() if _PART.fullmatch(p.name) and p.is_dir()}
    if not only_lock_left(path, also=parts):
        raise SparsecodeError(f"{path} exists and is not a store (no {MANIFEST}); pick a new --out")
    split = {int(_PART.fullmatch(name).group(2)) for name in parts}
    if split and split != {ranks}:
        k = max(split)
        raise SparsecodeError(f"{path} holds an unfinished harvest split over {k} ranks; run it again with "
                              f"`torchrun --nproc-per-node {k} -m sparsecode harvest ...` to finish it")


def has_shards(path: Path) -> bool:
    """Whether a (partial) store folder lists at least one written shard: something to resume from."""
    try:
        return bool(read_json(Path(path) / MANIFEST)["shards"])
    except (SparsecodeError, KeyError, TypeError):
        return False


def check_manifest(path: Path, m: Any) -> None:
    """Refuse a manifest that is not a store's, or whose counts contradict its shards."""
    where = Path(path) / MANIFEST
    if not isinstance(m, dict) or m.get("version") != VERSION:
        raise SparsecodeError(f"{where} is not a sparsecode store manifest")
    shards = m.get("shards")
    ok = isinstance(shards, list) and all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("rows"), int)
        and s["rows"] > 0 and isinstance(s.get("sha256"), dict) for s in shards)
    if not ok or not isinstance(m.get("tokens"), int):
        raise SparsecodeError(f"{where}: the shard list or token count is malformed")
    listed = sum(s["rows"] for s in shards)
    if listed != m["tokens"]:
        raise SparsecodeError(f"{where} says {m['tokens']} tokens but its shards hold {listed}; "
                              f"the store is inconsistent")
    if shards and not (isinstance(m.get("d"), int) and m["d"] > 0):
        raise SparsecodeError(f"{where}: width d={m.get('d')!r} is not a positive integer")


def verify_shard(root: Path, shard: dict[str, Any]) -> None:
    """Check every file of a shard against its sha256 in the manifest; a failure names the file."""
    verify_files(root, shard["sha256"], "store shard")


# --- reading --------------------------------------------------------------------------------------
class Store:
    """A complete store, read through memory maps; `verify` checks each shard's sha256 on first use."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path, self.verify = Path(path), verify
        if not self.path.is_dir():
            raise SparsecodeError(f"activation store not found: {self.path}")
        if not (self.path / MANIFEST).is_file():
            split = any(_PART.fullmatch(p.name) for p in self.path.iterdir())
            raise SparsecodeError(f"{self.path} is not an activation store: {MANIFEST} is missing" + (
                " (a harvest split over several ranks that has not finished; run it again to finish it)" * split))
        self.manifest = m = read_json(self.path / MANIFEST)
        check_manifest(self.path, m)
        if not m.get("complete"):
            raise SparsecodeError(f"store {self.path} is incomplete ({m['tokens']} of {m['tokens_requested']} "
                                  f"tokens); run the same harvest again to finish it")
        self.shards: list[dict[str, Any]] = m["shards"]
        self.d, self.dtype = int(m["d"]), m["dtype"]
        self.d_out = int(m.get("d_out") or 0)  # a paired store's target width (0: none)
        sites = m.get("sites") or []  # a store of several sites: their widths, in order, summing to d
        self.site_widths = tuple(s.get("width") if isinstance(s, dict) else None for s in sites)
        if not all(isinstance(w, int) and w > 0 for w in self.site_widths) or sites and sum(self.site_widths) != self.d:
            raise SparsecodeError(f"{self.path / MANIFEST}: the sites' widths {list(self.site_widths)} do not add "
                                  f"up to d={self.d}")
        self.starts = np.cumsum([0] + [s["rows"] for s in self.shards])
        self.n = int(self.starts[-1])
        self._maps = [self._map(info) for info in self.shards]  # every file present, of its listed shape
        self._verified: set[int] = set()

    def shard(self, i: int) -> dict[str, np.ndarray]:
        """Arrays of shard i: acts [rows, d] (bf16 as int16), tokens, doc, pos, memory-mapped; its sha256 is
        checked on first use."""
        if i not in self._verified:
            if self.verify:
                verify_shard(self.path, self.shards[i])
            self._verified.add(i)
        return self._maps[i]

    def _map(self, info: dict[str, Any]) -> dict[str, np.ndarray]:
        """Memory-map one shard's files, checking that they exist and hold the listed shape."""
        try:
            if self.manifest["file_format"] == "safetensors":
                arrays = _map_safetensors(self.path / f"{info['name']}.safetensors")
            else:
                meta = np.load(self.path / f"{info['name']}.meta.npy", mmap_mode="r")
                arrays = {"acts": np.load(self.path / f"{info['name']}.npy", mmap_mode="r"),
                          "tokens": meta[:, 0], "doc": meta[:, 1], "pos": meta[:, 2]}
                if self.d_out:
                    arrays["target"] = np.load(self.path / f"{info['name']}.target.npy", mmap_mode="r")
        except FileNotFoundError as e:
            raise SparsecodeError(f"store shard file missing: {e.filename}") from None
        except (OSError, ValueError, KeyError, IndexError, struct.error, json.JSONDecodeError,
                UnicodeDecodeError) as e:
            raise SparsecodeError(f"cannot read store shard {info['name']} in {self.path}: {e}") from None
        if arrays["acts"].shape != (info["rows"], self.d) or len(arrays["tokens"]) != info["rows"]:
            raise SparsecodeError(f"store shard {info['name']} has shape {arrays['acts'].shape}, "
                                  f"expected {(info['rows'], self.d)}")
        if self.d_out and arrays.get("target", np.empty(0)).shape != (info["rows"], self.d_out):
            raise SparsecodeError(f"store shard {info['name']} holds no target of shape {(info['rows'], self.d_out)}")
        return arrays

    def gather(self, idx: Tensor, key: str = "acts") -> Tensor:
        """Rows `idx` (global indices) of `acts` (or a paired store's `target`) as float32, or of tokens/doc/pos
        as int64."""
        order = idx.argsort()
        sorted_idx = idx[order].numpy()
        bounds = np.searchsorted(sorted_idx, self.starts)
        parts = []
        for i in range(len(self.shards)):
            lo, hi = bounds[i], bounds[i + 1]
            if lo < hi:
                parts.append(np.asarray(self.shard(i)[key][sorted_idx[lo:hi] - self.starts[i]]))
        rows = torch.from_numpy(np.concatenate(parts))
        if key in ("acts", "target"):
            rows = rows.view(torch.bfloat16) if self.dtype == "bf16" else rows
            rows = rows.float()
        else:
            rows = rows.long()
        out = torch.empty_like(rows)
        out[order] = rows
        return out


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file (header: u64 length, JSON, then raw data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, _ = spec["data_offsets"]
        out[name] = np.memmap(path, dtype=_ST_DTYPES[spec["dtype"]], mode="r", offset=8 + n + begin,
                              shape=tuple(spec["shape"]))
    return out


@dataclass
class StoreOptions:
    """Options of source kind `store`: how rows are shuffled and checked."""

    buffer_rows: int = 262144  # rows shuffled together (the shuffle buffer)
    chunk_rows: int = 1024  # consecutive rows read together
    verify: bool = True  # check each shard's sha256 when first opened

    def validate(self) -> None:
        positive(self, "chunk_rows")
        check(self.buffer_rows >= self.chunk_rows, "buffer_rows must be at least chunk_rows")


class StoreSource:
    """Shuffled epochs over one split of a store, through a shuffle buffer, resumable exactly."""

    def __init__(self, store: Store, rows: range, seed: int = 0, opts: StoreOptions | None = None):
        self.store, self.rows, self.seed = store, rows, seed
        self.opts = opts or StoreOptions()
        check(len(rows) > 0, f"store {store.path}: the split has no rows")
        self.d, self.d_out, self.site_widths = store.d, store.d_out, store.site_widths
        self.n_chunks = -(-len(rows) // self.opts.chunk_rows)
        self.per_window = max(1, self.opts.buffer_rows // self.opts.chunk_rows)
        self.epoch, self.pos = 0, 0
        self._plan_epoch = -1
        self._window: tuple[int, int, Tensor] | None = None  # (epoch, window, shuffled row indices)

    def __len__(self) -> int:
        return len(self.rows)

    def _plan(self) -> None:
        """The epoch's chunk order and the row offset where each window ends."""
        if self._plan_epoch == self.epoch:
            return
        g = torch.Generator().manual_seed(derive_seed(self.seed, f"store/epoch{self.epoch}"))
        c = self.opts.chunk_rows
        self.chunk_starts = torch.randperm(self.n_chunks, generator=g) * c + self.rows.start
        sizes = (self.rows.stop - self.chunk_starts).clamp(max=c)
        self.window_ends = torch.stack([s.sum() for s in sizes.split(self.per_window)]).cumsum(0)
        self._plan_epoch = self.epoch

    def _window_rows(self, w: int) -> Tensor:
        if self._window is None or self._window[:2] != (self.epoch, w):
            c = self.opts.chunk_rows
            starts = self.chunk_starts[w * self.per_window : (w + 1) * self.per_window]
            idx = torch.cat([torch.arange(s, min(s + c, self.rows.stop)) for s in starts.tolist()])
            g = torch.Generator().manual_seed(derive_seed(self.seed, f"store/epoch{self.epoch}/window{w}"))
            self._window = (self.epoch, w, idx[torch.randperm(len(idx), generator=g)])
        return self._window[2]

    def next_indices(self, n: int) -> Tensor:
        """The global row indices of the next `n` rows (advances the stream)."""
        parts, need = [], n
        while need:
            self._plan()
            w = int(torch.searchsorted(self.window_ends, self.pos, right=True))
            start = int(self.window_ends[w - 1]) if w else 0
            take = self._window_rows(w)[self.pos - start : self.pos - start + need]
            parts.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos == len(self.rows):
                self.epoch, self.pos = self.epoch + 1, 0
        return torch.cat(parts)

    def next_batch(self, n: int) -> Tensor:
        """[n, d] rows; a paired store's are [n, d + d_out]: acts, then the target's row beside it."""
        return self._rows(self.next_indices(n))

    def next_shard(self, n: int, rank: int, world: int) -> Tensor:
        """Rows [rank·n/world, (rank+1)·n/world) of the next n (the stream advances by n), the only ones read."""
        return self._rows(self.next_indices(n)[rank * n // world : (rank + 1) * n // world])

    def _rows(self, idx: Tensor) -> Tensor:
        x = self.store.gather(idx)
        return torch.cat([x, self.store.gather(idx, "target")], 1) if self.d_out else x

    def labelled_batch(self, n: int, classes: int = 32) -> tuple[Tensor, Tensor]:
        """Up to n rows of the split labelled by their next token, kept where that token is among the
        split's `classes` most frequent next tokens (neural collapse with next tokens as classes)."""
        idx = torch.arange(self.rows.start, self.rows.stop - 1)
        tokens, doc, pos = (self.store.gather(torch.arange(self.rows.start, self.rows.stop), k)
                            for k in ("tokens", "doc", "pos"))
        follows = (doc[1:] == doc[:-1]) & (pos[1:] == pos[:-1] + 1)
        nxt = tokens[1:]
        top = torch.bincount(nxt[follows]).topk(min(classes, int(follows.sum()))).indices
        keep = follows & torch.isin(nxt, top)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "store/labelled"))
        chosen = keep.nonzero()[:, 0]
        chosen = chosen[torch.randperm(len(chosen), generator=g)[:n]].sort().values
        return self.store.gather(idx[chosen]), nxt[chosen]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check(int(state.get("rows", len(self.rows))) == len(self.rows),
              f"store {self.store.path} changed since the checkpoint ({state.get('rows')} rows then, "
              f"{len(self.rows)} now)")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


@register_source("store", StoreOptions, claims=lambda p: p.is_dir() and (p / MANIFEST).is_file(),
                 described=f"a store folder (with {MANIFEST})")
def open_store(cfg: SourceConfig, split: str) -> StoreSource:
    """A store folder written by `sparsecode harvest` (SourceConfig.path); options: StoreOptions."""
    check(cfg.path is not None, "source kind 'store' needs a path (the store folder)")
    opts = from_dict(StoreOptions, cfg.options, "store source")
    store = Store(cfg.path, verify=opts.verify)
    return StoreSource(store, split_rows(store.n, cfg.heldout, split), cfg.seed, opts)
