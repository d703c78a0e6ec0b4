"""What RUN/features.sqlite holds (its files, bins, schema) and the queries `sparsecode browse` pages read."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SparsecodeError

DB, PARTIAL, PROGRESS = "features.sqlite", "features.sqlite.tmp", "features-progress.tmp"
CODES, INDPTR = "features-codes.tmp", "features-indptr.tmp"
VERSION = 1
LOG_EDGES = [round(-3 + 0.1 * i, 1) for i in range(61)]  # log10 |activation| bin edges (+ under/overflow bins)
COS_EDGES = [round(-1 + 0.05 * i, 2) for i in range(41)]  # cosine bin edges of codebooks
DENSE = 0.1  # an atom active on more than this share of tokens is dense (as in `diagnose`)
LOOKUPS = 1 << 21  # window lookups resolved per group in the final step (bounds its memory)
BLOCK = 1 << 16  # rows read at a time from the code file and the store in the final step

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


