"""The browser app: pages escape token text, the server binds 127.0.0.1 by default, the try-it box encodes what
the store holds, and a real headless Chromium drives it (list, feature page, try-it) without console errors."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from data_helpers import WORDS, gpt2_dir  # noqa: F401
from test_features import gpt2_store, small_run, small_store, topk_run  # noqa: F401

from sparsecode.browse import HOST, TryIt, make_server, readings
from sparsecode.cli import build_parser, main
from sparsecode.data.store import Store
from sparsecode.feature_db import FeatureDB
from sparsecode.features import FeatureConfig, build_features
from sparsecode.interop import load_coder

SCRIPT, IMG = "<script>alert(1)</script>", "<img src=x onerror=alert(2)>"
ESCAPED = ("&lt;script&gt;alert(1)&lt;/script&gt;", "&lt;img src=x onerror=alert(2)&gt;")


@pytest.fixture(scope="session")
def xss_run(gpt2_dir, tmp_path_factory) -> Path:  # noqa: F811
    """A run (with its database) on a corpus full of HTML: the tiny GPT-2 with both tags as single tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("xss")
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    tok.add_tokens([SCRIPT, IMG])
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    model.resize_token_embeddings(len(tok))
    tok.save_pretrained(root / "model")
    model.save_pretrained(root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (60,), generator=g).tolist()]
        for j in range(0, 60, 7):
            words[j] = SCRIPT if (i + j) % 2 else IMG
        (corpus / f"d{i:02d}.txt").write_text(" ".join(words) + ".")
    run = small_run(small_store(root / "model", corpus, root / "store"), root / "run")
    build_features(run, cfg=FeatureConfig(chunk_rows=512))
    return run


@contextlib.contextmanager
def serving(run: Path, host: str = HOST, port: int = 0):
    """The app on a free port in a background thread; yields (base URL, bound socket)."""
    server, sock = make_server(run, host, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        h, p = sock.getsockname()[:2]
        yield f"http://{h}:{p}", sock
    finally:
        server.should_exit = True
        thread.join(10)


def fetch(url: str, data: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, json.dumps(data).encode() if data is not None else None,
                                 {"content-type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_token_text_is_escaped_in_every_page(xss_run):
    fdb = FeatureDB(xss_run)
    ids = {fdb.search(SCRIPT)[0], fdb.search(IMG)[0]}
    shown = sorted({f for f, t in fdb.db.execute("SELECT feature, tokens FROM contexts")
                    if ids & set(torch.frombuffer(bytearray(t), dtype=torch.int32).tolist())})
    assert shown, "no stored context holds the tags"
    paths = ["/", "/features", f"/features?q={urllib.parse.quote(SCRIPT)}", f"/features?q={urllib.parse.quote(IMG)}"]
    paths += [f"/features/{f}" for f in shown[:8]]
    with serving(xss_run) as (base, _):
        pages = {p: fetch(base + p) for p in paths}
    for path, (status, html) in pages.items():
        assert status == 200, path
        assert SCRIPT not in html and IMG not in html and "<img" not in html, path
    feature_pages = "".join(pages[p][1] for p in paths[4:])
    assert all(e in feature_pages for e in ESCAPED)
    assert ESCAPED[0] in pages[paths[2]][1] and ESCAPED[1] in pages[paths[3]][1]  # the echoed query, the hits


def test_server_binds_localhost_by_default(topk_run):  # noqa: F811
    args = build_parser().parse_args(["browse", str(topk_run), "--port", "0"])
    assert args.host == HOST == "127.0.0.1"
    with serving(Path(args.run), args.host, args.port) as (base, sock):
        assert sock.getsockname()[0] == "127.0.0.1"
        assert fetch(base + "/")[0] == 200


def test_port_in_use_is_one_line_error(topk_run, capsys):  # noqa: F811
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        assert main(["browse", str(topk_run), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "pick another --port" in err and err.count("\n") == 1


def test_try_it_encodes_what_the_store_holds(gpt2_store, topk_run):  # noqa: F811
    """The first document typed in gives, token by token, the code of the store's first rows (a causal LM:
    the same prefix, so the same activations at the hooked module)."""
    fdb = FeatureDB(topk_run)
    corpus = Path(fdb.meta["corpus"])
    first = sorted(corpus.iterdir())[0].read_text()
    store = Store(gpt2_store)
    with torch.no_grad():
        code = load_coder(topk_run).encode(store.gather(torch.arange(20)))
    out = TryIt(topk_run, fdb.meta)(first)
    assert [t["text"] for t in out["tokens"][:20]] == [TryIt(topk_run, fdb.meta).load()[0].decode([t]) for t in
                                                        store.gather(torch.arange(20), "tokens").tolist()]
    for i in range(20):
        want = dict(zip(code.indices[i].tolist(), code.values[i].tolist(), strict=True))
        got = dict(out["tokens"][i]["features"])
        assert got.keys() == want.keys() and all(got[f] == pytest.approx(want[f], abs=1e-4) for f in got), i


def test_readings_flag_unhealthy_figures():
    meta = {"m": 1000, "k": 32, "codebook": False}
    healthy = {r["name"]: r["ok"] for r in readings({"fvu": 0.1, "l0": 32.0, "never_fired": 0.0, "dense": 0.0,
                                                    "spliced": {"loss_recovered": 0.95}}, meta)}
    sick = {r["name"]: r["ok"] for r in readings({"fvu": 0.5, "l0": 20.0, "never_fired": 0.02, "dense": 0.05,
                                                 "spliced": {"loss_recovered": 0.5}}, meta)}
    assert all(healthy.values()) and not any(sick.values()) and set(sick) == set(healthy)


def test_demo_ends_with_the_browse_command(tmp_path, monkeypatch, capsys):
    """The demo's closing hint names the two commands (its harvest, training and evaluation stubbed out)."""
    import sys

    import sparsecode.evaluate  # noqa: F401 (sys.modules: the package re-exports functions of these names)
    import sparsecode.train  # noqa: F401

    cli, harvest = sys.modules["sparsecode.cli"], sys.modules["sparsecode.data.harvest"]
    train, evaluate = sys.modules["sparsecode.train"], sys.modules["sparsecode.evaluate"]
    monkeypatch.setattr(harvest, "harvest", lambda *a, **k: None)
    monkeypatch.setattr(train, "train", lambda *a, **k: None)
    monkeypatch.setattr(cli, "last_metrics", lambda out: {"dead": 0.0})
    spliced = {"metric": "ce", "loss_clean": 1.0, "loss_spliced": 1.1, "loss_zero": 2.0, "loss_recovered": 0.9}
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: {"fvu": 0.1, "l0": 32.0, "never_fired": 0.0,
                                                                   "spliced": spliced})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--stores", str(tmp_path / "stores"), "--no-progress"]) == 0
    assert f"sparsecode features {out} && sparsecode browse {out}" in capsys.readouterr().out


def chromium():
    """(playwright's sync API, the system Chromium) or a skip naming what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the system Chromium is used)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    return sync_playwright, path


def test_browser_drives_the_app(xss_run):
    sync_playwright, path = chromium()
    errors, dialogs = [], []
    with serving(xss_run) as (base, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(base + "/features")
            first = page.locator("table.list a.feature-link").first
            feature = first.inner_text()
            first.click()
            page.wait_for_url(re.compile(rf"/features/{feature}$"))
            assert page.locator(".contexts.top .ctx").count() > 0
            assert page.locator(".contexts.top .tok.center").count() > 0
            assert page.locator("svg.hist rect").count() > 0
            shown = page.locator(".contexts .tok").all_inner_texts()
            assert SCRIPT in shown or IMG in shown  # the tags are token text, not elements
            page.goto(base + "/")
            page.fill("form.tryit textarea", f"the model reads {IMG} codes")
            page.click("form.tryit button[type=submit]")
            page.wait_for_selector(".tryit-tokens .tok", timeout=120_000)
            tokens = page.locator(".tryit-tokens .tok")
            assert IMG in tokens.all_inner_texts()
            acts = [float(a) for a in tokens.evaluate_all("(ts) => ts.map((t) => t.dataset.act)")]
            shades = tokens.evaluate_all("(ts) => ts.map((t) => getComputedStyle(t).backgroundColor)")
            assert all(a > 0 for a in acts)  # every token fires k features: each is shaded by its strongest
            assert all(re.fullmatch(r"rgba?\(255, 140, 0(, 0\.\d*[1-9]\d*)?\)", s) for s in shades), shades
            button = page.locator(".tryit-features button").first
            button.click()  # shade by one feature: only the tokens it fires on keep a colour
            acts = [float(a) for a in tokens.evaluate_all("(ts) => ts.map((t) => t.dataset.act)")]
            assert 0 < sum(a > 0 for a in acts) <= len(acts)
            page.locator(".tryit-features a.feature-link").first.click()
            page.wait_for_url(re.compile(r"/features/\d+$"))
            assert page.locator("h1").inner_text().startswith("Feature ")
        finally:
            browser.close()
    assert not errors, errors
    assert not dialogs, dialogs
