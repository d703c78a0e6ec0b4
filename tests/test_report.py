import json
import re
import shutil
import subprocess

import pytest

from sparsecode.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    assert main(["train", "--method", "vq", "--source", "clusters", "--source-opt", "d=16",
                 "--source-opt", "n_clusters=32", "-m", "32", "--steps", "60", "--batch-size", "256",
                 "--log-every", "10", "--out", str(root / "vq"), "--no-progress"]) == 0
    assert main(["train", "-m", "64", "-k", "4", "--source-opt", "d=16", "--source-opt", "n_features=32",
                 "--steps", "60", "--batch-size", "256", "--log-every", "10", "--out", str(root / "topk"),
                 "--no-progress"]) == 0
    return root


def test_report_is_self_contained_with_plots(runs, capsys):
    assert main(["report", str(runs / "vq")]) == 0
    page = (runs / "vq" / "report" / "index.html").read_text()
    imgs = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,', page)
    assert imgs == ["curves", "usage", "frequencies"]
    assert "nc_activations" in page and "nc1" in page  # the cluster labels give neural-collapse figures
    assert (runs / "vq" / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((runs / "vq" / "eval.json").read_text())["l0"] == 1.0


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (CI installs Debian's chromium)")
def test_report_renders_in_headless_chromium_without_errors(runs, tmp_path):
    main(["report", str(runs / "topk")])
    page = (runs / "topk" / "report" / "index.html").read_text()
    probe = ("<script>addEventListener('load', () => { const i = [...document.images];"
             " document.title = 'loaded ' + i.filter(x => x.complete && x.naturalWidth > 0).length"
             " + ' of ' + i.length; });</script></body>")
    (tmp_path / "p.html").write_text(page.replace("</body>", probe))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "p.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert "<title>loaded 3 of 3</title>" in proc.stdout, proc.stdout[:500]
    errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and ("Error" in ln or "error" in ln)]
    assert not errors, errors


def test_compare_prints_a_table_and_writes_the_plot(runs, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["compare", str(runs / "vq"), str(runs / "topk"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:6] == ["run", "method", "m", "k", "fvu", "l0"]
    assert "vq" in text and "topk" in text
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_values_from_a_crafted_run_folder_are_escaped(runs, tmp_path):
    """config.json is read from disk: a crafted one must render as text, never run script in the reader."""
    from sparsecode.report import write_report

    run = tmp_path / "crafted"
    shutil.copytree(runs / "topk", run)
    cfg = json.loads((run / "config.json").read_text())
    payload = "<script>alert(1)</script>"
    cfg.update(steps=payload, batch_size='<img src=x onerror="alert(2)">', method=payload)
    (run / "config.json").write_text(json.dumps(cfg))
    page = write_report(run, {"fvu": 0.5, payload: payload}).read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=" in page


def test_report_shows_the_diagnosis_that_diagnose_prints(runs, capsys):
    """One section, the same text as `sparsecode diagnose`, escaped; computed once and kept in the run."""
    import html

    run = runs / "topk"
    assert main(["diagnose", str(run)]) == 0
    text = capsys.readouterr().out.strip()
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert page.count("<h2>diagnosis</h2>") == 1 and f"<pre>{html.escape(text)}</pre>" in page
    kept = json.loads((run / "diagnosis.json").read_text())
    payload = "<script>alert(3)</script>"
    (run / "diagnosis.json").write_text(json.dumps({**kept, "text": payload}))
    assert main(["report", str(run)]) == 0  # the kept diagnosis of the last checkpoint: shown, not recomputed
    page = (run / "report" / "index.html").read_text()
    assert "<script>alert" not in page and f"<pre>{html.escape(payload)}</pre>" in page
    (run / "diagnosis.json").write_text(json.dumps(kept))


def test_report_of_a_run_the_doctor_cannot_read_says_why(runs, tmp_path):
    from sparsecode.report import write_report

    run = tmp_path / "memory"
    shutil.copytree(runs / "topk", run)
    (run / "diagnosis.json").unlink(missing_ok=True)
    cfg = json.loads((run / "config.json").read_text())
    # a run trained on an in-memory tensor: the doctor has no held-out rows of its own
    (run / "config.json").write_text(json.dumps({**cfg, "source": {**cfg["source"], "kind": "memory"}}))
    page = write_report(run, {"fvu": 0.5}).read_text()
    assert "<h2>diagnosis</h2><p>not diagnosed: run " in page and "--data FILE.npy" in page
