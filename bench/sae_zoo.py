"""The SAE zoo: every sparse-dictionary method trained on the same data at matched sizes, one markdown table.

    .venv/bin/python bench/sae_zoo.py [--sets superposition,hierarchical,signed] [--store PATH] [--steps 1500]
        [--batch 1024] [--m 512] [--k 6] [--methods topk,mp,...] [--out zoo.md]

Columns: FVU and L0 on held-out rows, dead % (latents that never fire on them), dense % (firing on >10%),
ground-truth recovery (share of true features with an atom at cosine > 0.9), training wall time. The
hierarchical set adds children, children strict (the best atom nearer to the child than to its parent +
child composite), parents and composites (`Hierarchical.recovery`); the signed set adds features carried
in both polarities (`both_polarities`, on the held-out codes). `--store PATH` adds a real-activation set (a
store directory, or a .npy file), which has no ground truth.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import sparsecode.data.hierarchical  # noqa: F401  (registers the "hierarchical" source kind)
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.data.synthetic import both_polarities
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, train

METHODS = ["topk", "batchtopk", "matryoshka", "abstopk", "refit", "topafa", "vsae", "relu", "jumprelu", "gba", "mp",
           "itda"]
HIER = {"children": "children %", "children_strict": "children strict %", "parents": "parents %",
        "composites": "composites %"}
SIGNED = {"both": "both polarities %"}


def coder_options(method: str, m: int, k: int) -> dict[str, Any]:
    """Matched sizes: same m everywhere; k (or T) where the method has one; penalties set for L0 ≈ k."""
    base: dict[str, Any] = {"m": m, "dead_tokens": 20_000}
    per_method: dict[str, dict[str, Any]] = {
        "topafa": {"k": 4 * k, "afa_coef": 4.0},
        "relu": {"l1_coef": 0.5},
        "gba": {"freq_max": 0.1, "freq_min": 0.01, "groups": 4},
        "itda": {"k": k, "max_error": 0.2},
    }
    if method in per_method:
        return {**base, **per_method[method]}
    return {**base, "k": k}


def sources(names: list[str], d: int, store: str | None) -> dict[str, SourceConfig]:
    out = {}
    if "superposition" in names:
        out["superposition"] = SourceConfig(kind="synthetic", options={"d": d, "n_features": 4 * d, "active": 3})
    if "hierarchical" in names:
        out["hierarchical"] = SourceConfig(kind="hierarchical", options={"d": d, "n_parents": d // 2,
                                                                          "n_children": 4})
    if "signed" in names:
        out["signed"] = SourceConfig(kind="synthetic", options={"d": d, "n_features": 2 * d, "active": 3,
                                                                "signed": True})
    if store:
        out[f"store {Path(store).name}"] = SourceConfig(kind="npy" if store.endswith(".npy") else "store", path=store)
    return out


def run_one(method: str, name: str, src: SourceConfig, a: argparse.Namespace, root: Path) -> dict[str, Any]:
    cfg = TrainConfig(method=method, coder=coder_options(method, a.m, a.k), source=src, steps=a.steps,
                      batch_size=a.batch, lr=a.lr, seed=a.seed, log_every=max(1, a.steps // 10),
                      ckpt_every=a.steps, device=a.device)
    t0 = time.perf_counter()
    coder = train(cfg, root / f"{method}-{name}".replace(" ", "_"))
    wall = time.perf_counter() - t0
    eval_src = open_source(src, "eval")
    res = evaluate(coder, eval_src, rows=a.eval_rows)
    row = {"method": method, "fvu": res["fvu"], "l0": res["l0"], "dead": res["never_fired"],
           "dense": res["dense"], "recovered": res.get("recovered"), "cos": res.get("mean_best_cos"), "wall": wall}
    if hasattr(eval_src, "children"):
        row.update(eval_src.recovery(coder.atoms()))
    if getattr(getattr(eval_src, "cfg", None), "signed", False):
        x = eval_src.next_batch(a.eval_rows).to(coder.atoms().device)
        with torch.no_grad():
            row["both"] = both_polarities(coder.atoms(), coder.eval().encode(x), eval_src.truth)
    return row


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{100 * v:.1f}" if pct else f"{v:.3f}" if v < 100 else f"{v:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    extra = {**HIER, **SIGNED}
    extra = {key: name for key, name in extra.items() if key in rows[0]}
    head = ["method", "FVU", "L0", "dead %", "dense %", "recovered %", "mean best cos", *extra.values(), "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], fmt(r["fvu"]), f"{r['l0']:.2f}", fmt(r["dead"], True), fmt(r["dense"], True),
                 fmt(r["recovered"], True), fmt(r["cos"])]
        cells += [fmt(r[key], True) for key in extra]
        cells += [f"{r['wall']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="superposition,hierarchical,signed", help="comma-separated synthetic sets")
    p.add_argument("--store", default=None, help="real activations: a store directory or a .npy file")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--m", type=int, default=512)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=16384)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription)")
    p.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    methods = [m for m in a.methods.split(",") if m]
    parts = [f"Command: `{shlex.join(['.venv/bin/python', 'bench/sae_zoo.py', *sys.argv[1:]])}`",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
             f"{torch.__version__}, device {a.device}; d={a.d}, m={a.m}, k={a.k}, {a.steps} steps × {a.batch} rows."]
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in sources(a.sets.split(","), a.d, a.store).items():
            rows = []
            for method in methods:
                rows.append(run_one(method, name, src, a, Path(tmp)))
                print(f"{name}: {method} done ({rows[-1]['wall']:.1f} s)", file=sys.stderr)
            parts.append(f"### {name}\n\n{table(rows)}")
    text = "\n\n".join(parts) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
