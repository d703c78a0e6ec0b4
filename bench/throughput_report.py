"""What bench/throughput.py writes: the device, versions and commit measured, the goals of issue 8 and the
markdown table (the form BENCHMARKS.md quotes)."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path
from typing import Any

import torch
from throughput_harness import Case

# the files whose changes make a measurement "+ uncommitted changes"
MEASURED = ["sparsecode", "bench/throughput.py", "bench/throughput_harness.py", "bench/throughput_memory.py",
            "bench/throughput_quality.py", "bench/throughput_report.py", "bench/contenders"]


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def goals(rows: list[dict[str, Any]], qual: dict[str, Any] | None, floors: dict[str, dict], gpu: bool):
    out = []

    def speedup(label: str, lib: str) -> float | None:
        r = [x for x in rows if x["label"] == label and x["lib"] == lib and "sparsecode_speedup" in x]
        return r[0]["sparsecode_speedup"] if r else None

    def goal(text: str, ratio: float | None, need: float, unit: str = "×"):
        verdict = "not measured" if ratio is None else ("met" if ratio >= need else "not met")
        shown = "n/a" if ratio is None else (f"{ratio:.2f}{unit}" if unit == "×" else f"{ratio:.0%}")
        out.append({"kind": "goal", "goal": text, "need": need, "ratio": ratio, "verdict": verdict,
                    "line": f"{text}: **{verdict}** ({shown})"})

    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        kind = next(r["case"] for r in rows if r["label"] == label)
        if kind == "topk" and not gpu:
            goal(f"CPU {label} ≥ 1.5× SAELens", speedup(label, "saelens"), 1.5)
        if kind == "vq" and not gpu:
            goal(f"CPU {label} ≥ 2× vector-quantize-pytorch", speedup(label, "vqp"), 2.0)
        if kind == "topk" and gpu and "m=24576" in label:
            sc = next((r for r in rows if r["label"] == label and r["lib"] == "sparsecode"), None)
            fl = floors.get(label)
            share = sc["rows_per_s"] / fl["floor_tok_s"] if sc and fl else None
            goal(f"GPU {label} ≥ 50% of the floor", share, 0.5, unit="%")
            goal(f"GPU {label} ≥ 5× sparsify", speedup(label, "sparsify"), 5.0)
        if kind == "topk" and gpu and "m=65536" in label:
            goal(f"GPU {label} ≥ 4× sparsify", speedup(label, "sparsify"), 4.0)
        if kind == "vq" and gpu and "K=65536" in label:
            goal(f"GPU {label} ≥ 10× vector-quantize-pytorch", speedup(label, "vqp"), 10.0)
    if qual is not None:
        out.append({"kind": "goal", "goal": "quality: FVU within 1% of the reference", "need": 0.01,
                    "ratio": qual["rel_diff"], "verdict": "met" if qual["met"] else "not met",
                    "line": f"quality: FVU within 1% of the reference: **{'met' if qual['met'] else 'not met'}** "
                            f"({qual['rel_diff']:.2%} apart: {qual['fvu_sparsecode']:.4f} vs "
                            f"{qual['fvu_reference']:.4f})"})
    return out


def markdown(meta: dict[str, Any], rows, cases: list[Case], qual, goal_rows, floors) -> str:
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    v = meta["versions"]
    peers = ", ".join(f"{pkg} {v.get(pkg, '–')}" for pkg in ("sae-lens", "eai-sparsify", "vector-quantize-pytorch"))
    lines = [f"### Training-step throughput, {meta['device']} ({meta['date']})", "",
             f"torch {meta['torch']}, {meta['threads']} threads, python {meta['python']}; {peers}; "
             f"load average at start {meta['loadavg']}; sparsecode at {meta['git']}", "",
             f"Command: `{meta['command']}`", "",
             f"Median of {meta['rounds']}×{meta['steps']} timed steps per contender after {meta['warmup']} warm-up "
             f"steps, contenders interleaved round-robin. ×: sparsecode's speed-up over that contender "
             f"(median of per-round ratios). Step peak: {meta['memory']}. "
             f"State: parameters + buffers + optimizer state.",
             "", "| case | contender | ms / step | rows/s | sparsecode × | step peak MiB | state MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['contender']} | {r['step_ms']:.1f} | {r['rows_per_s']:,.0f} | "
                     f"{fmt(r.get('sparsecode_speedup'), '.2f')} | {fmt(r['step_peak_mib'], ',.0f')} | "
                     f"{r['state_mib']:,.1f} |")
    for label, fl in floors.items():
        lines.append(f"\nFloor {label}: bf16 matmul {fl['matmul_ms']:.2f} ms + fused Adam {fl['adam_ms']:.2f} ms = "
                     f"{fl['floor_tok_s'] / 1e6:.2f}M tok/s")
    skipped = [f"{c.label} {n}: {why}" for c in cases for n, why in c.skipped.items()]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    scaled = [c.label for c in cases if c.scalable and c.sizes.get("rows") != c.sizes.get("rows_asked")]
    if scaled:
        lines += ["", "Scaled down (a step took longer than --max-step-s): " + ", ".join(scaled)]
    if qual is not None:
        lines += ["", f"Quality: TopK d={qual['d']} m={qual['m']} k={qual['k']}, batch {qual['batch']}, "
                      f"{qual['steps']} steps, AuxK for latents idle {qual['dead_after_batches']} batches "
                      f"(dead at the end: "
                      f"{qual['dead_sparsecode']:.1%} / {qual['dead_reference']:.1%}): held-out FVU sparsecode "
                      f"{qual['fvu_sparsecode']:.4f}, plain fp32 reference {qual['fvu_reference']:.4f}."]
    lines += ["", "Goals (issue 8):", ""] + [f"- {g['line']}" for g in goal_rows]
    return "\n".join(lines) + "\n"


def git_state() -> str:
    """The commit measured, and whether sparsecode/ or the benchmark's files (MEASURED) differ from it."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", *MEASURED], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("sparsecode", "sae-lens", "eai-sparsify", "vector-quantize-pytorch", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out
