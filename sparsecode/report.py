"""Reports: a self-contained HTML page per run (plots embedded as PNG) and a comparison of runs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from .errors import SparsecodeError
from .files import atomic_write, read_json, read_jsonl


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def read_log(run: Path) -> list[dict[str, Any]]:
    """The training log; an imported run (origin.json, never trained here) has none."""
    log = Path(run) / "metrics.jsonl"
    if not log.is_file():
        if (Path(run) / "origin.json").is_file():
            return []
        raise SparsecodeError(f"{run} has no metrics.jsonl; is it a run folder?")
    return read_jsonl(log)


def curves_plot(log: list[dict[str, Any]]) -> bytes:
    """Loss, FVU, L0 and dead share over training."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    steps = [r["step"] for r in log]
    for ax, key, title in zip(axes, ("loss", "fvu", "l0", "dead"), ("loss", "FVU", "L0", "dead share"),
                              strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in log])
        ax.set_title(title)
        ax.set_xlabel("step")
        if key in ("loss", "fvu"):
            ax.set_yscale("log")
    fig.tight_layout()
    return _png(fig)


def usage_plot(log: list[dict[str, Any]]) -> bytes:
    """Utilisation and perplexity of the atoms over training."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    steps = [r["step"] for r in log]
    a.plot(steps, [r["utilisation"] for r in log])
    a.set_ylim(0, 1.05)
    a.set_title("utilisation (share of atoms used per log window)")
    b.plot(steps, [r["perplexity"] for r in log])
    b.set_title("perplexity of atom usage")
    for ax in (a, b):
        ax.set_xlabel("step")
    fig.tight_layout()
    return _png(fig)


def histogram_plot(hist: dict[str, Any]) -> bytes:
    """Histogram of log10 firing frequency (held-out data)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    edges, counts = hist["log10_edges"], hist["counts"]
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:], strict=False)], align="edge")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("atoms")
    ax.set_title(f"feature frequencies ({hist['never_fired']} atoms never fired)")
    fig.tight_layout()
    return _png(fig)


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def diagnosis_section(run: Path, diagnosis: dict[str, Any] | None = None) -> str:
    """The collapse doctor's text (`sparsecode diagnose`), from the run's diagnosis.json when it is of the last
    checkpoint, else computed (and kept) now; a run the doctor cannot read says why."""
    if diagnosis is None:
        from .evaluate import diagnose_run

        try:
            diagnosis = diagnose_run(run, reuse=True)
        except SparsecodeError as e:
            return f"<h2>diagnosis</h2><p>not diagnosed: {html.escape(str(e))}</p>"
    on = f"rows of {diagnosis['data']}" if diagnosis.get("data") else "held-out rows"
    return (f"<h2>diagnosis</h2><p>{html.escape(str(diagnosis.get('rows')))} {html.escape(on)}, checkpoint "
            f"{html.escape(str(diagnosis.get('checkpoint')))} (<code>sparsecode diagnose</code>)</p>"
            f"<pre>{html.escape(str(diagnosis.get('text', '')))}</pre>")


def origin_section(run: Path) -> str:
    """Where an imported run came from (its origin.json), or nothing for a run trained here."""
    if not (run / "origin.json").is_file():
        return ""
    origin = read_json(run / "origin.json")
    keys = ("format", "architecture", "source", "sae", "model", "hook")
    return f"<h2>imported</h2>{_table({k: origin.get(k) for k in keys if isinstance(origin, dict)})}"


def write_report(run: Path, result: dict[str, Any], out: Path | None = None,
                 diagnosis: dict[str, Any] | None = None) -> Path:
    """Write `<run>/report/index.html` (plots embedded, PNGs beside it, the diagnosis of `diagnosis_section`
    unless `diagnosis` is given); returns the page's path."""
    from .metrics import flat_metrics

    run = Path(run)
    cfg = read_json(run / "config.json")
    keys = ("method", "coder", "source", "steps", "batch_size")
    missing = [k for k in keys if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise SparsecodeError(f"{run / 'config.json'} is not a run config (no {', '.join(missing)})")
    log = read_log(run)
    out = Path(out) if out else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    plots = {"curves": curves_plot(log), "usage": usage_plot(log)} if log else {}
    if "frequency_histogram" in result:
        plots["frequencies"] = histogram_plot(result["frequency_histogram"])
    sweep = run / "report" / "steer_sweep.png"  # written by `sparsecode steer --sweep`
    if sweep.is_file():
        plots["steer_sweep"] = sweep.read_bytes()
    for name, png in plots.items():
        atomic_write(out / f"{name}.png", png)
    imgs = "".join(f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                   f"<figcaption>{name}</figcaption></figure>" for name, png in plots.items())
    metrics = flat_metrics(result)
    groups = {g: {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith(g + ".")}
              for g in ("sites", "spliced", "nc_activations", "nc_codes", "posterior")}
    main = {k: v for k, v in metrics.items() if "." not in k}
    if result.get("fvu_of") == "target":  # a transcoder: its FVU is of the target, its codes of the input
        main = {"fvu of": "the target (a transcoder; codes of the input)", **main}
    sections = "".join(f"<h2>{html.escape(g)}</h2>{_table(rows)}" for g, rows in groups.items() if rows)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sparsecode report: {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left}}figure{{display:inline-block;margin:.5em}}
img{{max-width:100%}}code,pre{{background:#f4f4f4}}pre{{padding:.5em;white-space:pre-wrap}}</style></head><body>
<h1>{html.escape(run.name)}: {html.escape(str(cfg["method"]))}</h1>
<p>coder <code>{html.escape(json.dumps(cfg["coder"]))}</code>;
source <code>{html.escape(json.dumps(cfg["source"]))}</code>; {html.escape(str(cfg["steps"]))} steps of
{html.escape(str(cfg["batch_size"]))}</p>{origin_section(run)}
<h2>held-out evaluation</h2>{_table(main)}{sections}
{diagnosis_section(run, diagnosis)}
<h2>plots</h2>{imgs}
</body></html>
"""
    atomic_write(out / "index.html", page.encode())
    return out / "index.html"


def compare(runs: list[Path], out: Path) -> list[dict[str, Any]]:
    """One row of figures per run (eval.json where present, else the last log line) + an FVU-vs-L0 plot."""
    rows = []
    for run in map(Path, runs):
        if not run.is_dir():
            raise SparsecodeError(f"run directory not found: {run}")
        cfg = read_json(run / "config.json")
        log = read_log(run)
        ev = read_json(run / "eval.json") if (run / "eval.json").is_file() else {}
        if not log and not ev:
            raise SparsecodeError(f"{run} was imported and not evaluated yet: sparsecode eval {run} --data STORE")
        last = log[-1] if log else {"fvu": None, "l0": None, "dead": None, "utilisation": None}
        rows.append({
            "run": str(run), "method": cfg["method"], "m": cfg["coder"].get("m"), "k": cfg["coder"].get("k"),
            "fvu": ev.get("fvu", last["fvu"]), "l0": ev.get("l0", last["l0"]), "dead": last["dead"],
            "utilisation": ev.get("utilisation", last["utilisation"]),
            "loss_recovered": ev.get("spliced", {}).get("loss_recovered"), "source": "eval" if ev else "train log",
        })
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["l0"], r["fvu"])
        ax.annotate(Path(r["run"]).name, (r["l0"], r["fvu"]), fontsize=8)
    ax.set_xlabel("L0 (active atoms per token)")
    ax.set_ylabel("FVU")
    ax.set_title("FVU vs L0 (lower left is better)")
    fig.tight_layout()
    atomic_write(Path(out), _png(fig))
    return rows
