"""`sparsecode browse`: a local web app over RUN/features.sqlite (starlette on uvicorn, Jinja2 with autoescape).

Pages read the database only (nothing is recomputed); the try-it box runs the store's model up to the hooked
module and the run's coder on the typed text, on the server. Token text is escaped by Jinja2 in pages and set
as text (never as HTML) by the script; a Content-Security-Policy allows no inline script either. The server
listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

from .errors import SparsecodeError
from .feature_db import DENSE, FeatureDB
from .features import FeatureConfig, build_features

HOST = "127.0.0.1"
TEMPLATES = Path(__file__).parent / "templates"
PAGE_SIZE = 100
MAX_TEXT = 4000  # characters the try-it box accepts
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# rules of thumb for the overview's reading of eval.json (dead and dense shares as `sparsecode diagnose` reads them)
DEAD_SHARE, DENSE_SHARE, FVU_OK, RECOVERED_OK, PPL_SHARE, TWIN_COS = 0.01, 0.01, 0.2, 0.9, 0.5, 0.99


# --- readings of the run's held-out metrics ---------------------------------------------------------------------
def readings(ev: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """(name, value, healthy or not, one line) for each figure of eval.json that has a reading."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, ok: bool | None, text: str) -> None:
        out.append({"name": name, "value": value, "ok": ok, "text": text})

    m, k = meta["m"], meta.get("k")
    if "fvu" in ev:
        add("fvu", f"{ev['fvu']:.4f}", ev["fvu"] <= FVU_OK,
            f"the code leaves {ev['fvu']:.1%} of the held-out variance unexplained (healthy below {FVU_OK:.0%})")
    if "l0" in ev:
        near = k is None or meta["codebook"] or abs(ev["l0"] - k) <= 0.1 * k
        add("l0", f"{ev['l0']:.2f}", near, f"{ev['l0']:.1f} active atoms per token"
            + ("" if k is None or meta["codebook"] else f" for k={k} (healthy within 10% of k)"))
    if "never_fired" in ev:
        dead = ev["never_fired"]
        add("dead share", f"{dead:.2%}", dead <= DEAD_SHARE,
            f"{round(dead * m)} of {m} atoms never fired on the held-out rows (healthy up to {DEAD_SHARE:.0%})")
    if "dense" in ev:
        add("dense share", f"{ev['dense']:.2%}", ev["dense"] <= DENSE_SHARE,
            f"atoms active on more than {DENSE:.0%} of tokens (healthy up to {DENSE_SHARE:.0%} of the atoms)")
    if "perplexity" in ev:
        share = ev["perplexity"] / m
        add("perplexity", f"{ev['perplexity']:.1f}", share >= PPL_SHARE,
            f"usage is spread like {share:.0%} of the atoms used equally (healthy from {PPL_SHARE:.0%})")
    if "cos_max" in ev:
        add("max atom cosine", f"{ev['cos_max']:.3f}", ev["cos_max"] < TWIN_COS,
            f"the two closest atoms {'are duplicates' if ev['cos_max'] >= TWIN_COS else 'are distinct'} "
            f"(duplicates from cosine {TWIN_COS})")
    sp = ev.get("spliced") or {}
    if "loss_recovered" in sp:
        add("loss recovered", f"{sp['loss_recovered']:.1%}", sp["loss_recovered"] >= RECOVERED_OK,
            f"spliced into the model, the code recovers {sp['loss_recovered']:.1%} of the loss zero-ablation "
            f"loses (healthy from {RECOVERED_OK:.0%})")
    if "rows" in ev:
        add("held-out rows", ev["rows"], None, "rows these figures were computed on")
    return out


# --- bars (inline SVG, drawn from stored counts) ----------------------------------------------------------------
def bars(counts: list[int], labels: list[str], trim: bool = True, width: int = 560, height: int = 120) -> dict:
    """Rectangles of a bar chart of `counts` (sqrt scale), a tooltip per bar from `labels` ("low–high"), and
    the axis ends; `trim` drops the empty bins at both ends."""
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return {"width": width, "height": height, "bars": [], "empty": True}
    lo, hi = (nz[0], nz[-1] + 1) if trim else (0, len(counts))
    counts, labels = counts[lo:hi], labels[lo:hi]
    top = math.sqrt(max(counts))
    w = width / len(counts)
    out = []
    for i, (c, lab) in enumerate(zip(counts, labels, strict=True)):
        h = (height - 2) * math.sqrt(c) / top
        out.append({"x": round(i * w, 2), "w": round(max(w - 1, 1), 2), "h": round(h, 2), "y": round(height - h, 2),
                    "label": f"{lab}: {c}"})
    return {"width": width, "height": height, "empty": False, "bars": out,
            "first": labels[0].split("–")[0], "last": labels[-1].split("–")[-1]}


def hist_labels(meta: dict[str, Any]) -> list[str]:
    """A label per bin of the activation histogram (under- and overflow bins first and last)."""
    e = meta["hist_edges"]
    fmt = (lambda x: f"{10 ** x:.3g}") if meta["hist_log"] else (lambda x: f"{x:g}")
    return [f"< {fmt(e[0])}"] + [f"{fmt(a)}–{fmt(b)}" for a, b in zip(e[:-1], e[1:], strict=True)] + [f"≥ {fmt(e[-1])}"]


# --- the try-it box --------------------------------------------------------------------------------------------
class TryIt:
    """Typed text through the store's model to the hooked module, then the run's coder: the features per token.

    Loaded on first use and kept; one request at a time."""

    def __init__(self, run: Path, meta: dict[str, Any], device: str = "cpu"):
        self.run, self.meta, self.device = run, meta, device
        self.lock = threading.Lock()
        self.parts: tuple[Any, ...] | None = None

    def load(self) -> tuple[Any, ...]:
        from .data.contexts import Layout
        from .device import pick_device
        from .interop import load_coder
        from .model import Hooked, load_model

        if self.parts is None:
            meta = self.meta
            model, tok, _ = load_model(meta["model"], meta.get("revision"), pick_device(self.device),
                                       meta.get("tokenizer"))
            hooked = Hooked(model, meta["hook"], meta.get("hook_point", "output"))
            layout = Layout.of(tok, int(meta.get("context") or 128), bool(meta.get("prepend_bos", True)))
            self.parts = (tok, hooked, layout, load_coder(self.run, device=hooked.device).eval())
        return self.parts

    def __call__(self, text: str, feature: int | None = None, per_token: int = 16) -> dict[str, Any]:
        import torch

        from .features import encode

        with self.lock:
            tok, hooked, layout, coder = self.load()
            ids = tok.encode(text, add_special_tokens=False)[: layout.content]
            if not ids:
                return {"tokens": [], "features": []}
            full = torch.tensor([layout.prefix + ids + layout.suffix])
            x = hooked(full, torch.ones_like(full))[0, len(layout.prefix) : len(layout.prefix) + len(ids)]
            code = encode(coder, x.float())
        tokens, best = [], {}
        for i, t in enumerate(ids):
            active = code.active()[i]
            pairs = sorted(zip(code.indices[i][active].tolist(), code.values[i][active].tolist(), strict=True),
                           key=lambda p: -p[1])
            shown = pairs[:per_token] + [p for p in pairs[per_token:] if p[0] == feature]
            tokens.append({"text": tok.decode([t]), "features": [[f, round(v, 5)] for f, v in shown]})
            for f, v in pairs:
                b = best.setdefault(f, [f, v, 0])
                b[1], b[2] = max(b[1], v), b[2] + 1
        ranked = sorted(best.values(), key=lambda b: (-b[2], -b[1]))[:48]
        return {"tokens": tokens, "features": [[f, round(v, 5), c] for f, v, c in ranked]}


# --- the app -----------------------------------------------------------------------------------------------------
def _float(params: Any, key: str) -> float | None:
    try:
        v = float(params.get(key, ""))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def make_app(run: str | Path, device: str = "cpu", tryit: TryIt | None = None):
    """The starlette app serving RUN/features.sqlite."""
    from jinja2 import Environment, FileSystemLoader
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    run = Path(run)
    db = FeatureDB(run)
    meta = db.meta
    tryit = tryit or TryIt(run, meta, device)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    noun = "code" if meta["codebook"] else "feature"
    base = {"meta": meta, "noun": noun, "run_name": run.resolve().name}

    def page(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**base, **ctx), status, headers=HEADERS)

    def overview(request):
        ev_path = run / "eval.json"
        ev = json.loads(ev_path.read_text()) if ev_path.is_file() else None
        e = meta["freq_edges"]
        freq_labels = [f"10^{a:.2f}–10^{b:.2f}" for a, b in zip(e[:-1], e[1:], strict=True)]
        return page("overview.html", eval=ev, readings=readings(ev, meta) if ev else [],
                    freq=bars(meta["freq_counts"], freq_labels, trim=False), **db.overview())

    def features(request):
        p = request.query_params
        q = p.get("q", "")[:200]
        sort = p.get("sort") or ("hits" if q.strip() else "density")
        desc = p.get("order", "desc") != "asc"
        try:
            number = max(1, int(p.get("page", "1")))
        except ValueError:
            number = 1
        filters = {k: _float(p, k) for k in ("min_density", "max_density", "min_max", "max_max")}
        rows, total = db.features(sort, desc, q, **filters, offset=(number - 1) * PAGE_SIZE, limit=PAGE_SIZE)
        args = {"q": q, **{k: p.get(k, "") for k in filters}}
        return page("list.html", rows=rows, total=total, sort=sort, desc=desc, q=q, args=args, page=number,
                    pages=max(1, -(-total // PAGE_SIZE)))

    def feature(request):
        f = request.path_params["id"]
        info = db.feature(f)
        if info is None:
            return page("missing.html", 404, what=f"{noun} {f}")
        return page("feature.html", f=info, hist=bars(info["hist"], hist_labels(meta)))

    async def api_try(request):
        try:
            body = await request.json()
            text = str(body.get("text", ""))[:MAX_TEXT]
            feature = body.get("feature")
            feature = int(feature) if feature is not None else None
        except (ValueError, TypeError, AttributeError, json.JSONDecodeError):
            return JSONResponse({"error": "expected JSON {\"text\": ..., \"feature\": N}"}, 400, headers=HEADERS)
        try:
            result = await run_in_threadpool(tryit, text, feature)
        except SparsecodeError as e:
            return JSONResponse({"error": str(e)}, 503, headers=HEADERS)
        return JSONResponse(result, headers=HEADERS)

    def static(request):
        name = request.path_params["name"]
        kinds = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in kinds:
            return Response("not found", 404, headers=HEADERS)
        return Response((TEMPLATES / name).read_bytes(), media_type=kinds[name], headers=HEADERS)

    return Starlette(routes=[Route("/", overview), Route("/features", features),
                             Route("/features/{id:int}", feature), Route("/api/try", api_try, methods=["POST"]),
                             Route("/static/{name}", static)])


# --- serving -----------------------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (one line naming the port when it is taken)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SparsecodeError(f"cannot listen on {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise SparsecodeError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None
    return sock


def make_server(run: str | Path, host: str = HOST, port: int = 8000, device: str = "cpu"):
    """(uvicorn server, its bound socket) for RUN; run it with server.run(sockets=[sock])."""
    import uvicorn

    app = make_app(run, device)  # a missing or broken database: one line, before the port is taken
    sock = bind(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config), sock


def serve(run: str | Path, host: str = HOST, port: int = 8000, device: str = "cpu") -> None:
    """Serve RUN's feature database until interrupted."""
    server, sock = make_server(run, host, port, device)
    h, p = sock.getsockname()[:2]
    print(f"browsing {run} on http://{f'[{h}]' if ':' in h else h}:{p}/  (Ctrl-C to stop)", flush=True)
    server.run(sockets=[sock])


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
    serve(a.run, a.host, a.port, a.device)
    return 0
