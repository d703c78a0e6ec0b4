"""The feature database's final step: context windows, co-firing, neighbours, logit effects and token text,
written into features.sqlite (under a temp name, renamed at the end)."""

from __future__ import annotations

import json
import math
import mmap
import os
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .feature_db import (
    BLOCK,
    CODES,
    COS_EDGES,
    DB,
    DENSE,
    INDEXES,
    INDPTR,
    LOG_EDGES,
    LOOKUPS,
    PARTIAL,
    SCHEMA,
)


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


def windows(store: Any, codes: CodeFile, feat: Tensor, center: Tensor, cfg: Any, n: int, m: int):
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


def finalize(run: Path, store: Any, coder: Any, atoms: Tensor, tally: Any, cfg: Any, n: int,
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



def run_meta(run: Path, store: Any, coder: Any, atoms: Tensor, cfg: Any, n: int, score: str,
             rate: float | None, logits: bool, density: Tensor, tokenizer: Any) -> dict[str, Any]:
    """What the overview shows: the run, the store, the pass and the frequency histogram."""
    from .run_config import load_config

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
