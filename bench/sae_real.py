"""SAEs on real activations beside SAELens (issue 14): TopK, BatchTopK, Matryoshka, JumpReLU and ReLU on one store.

Each method is trained by sparsecode (`sparsecode.train.train`, the method at its defaults but m, k, lr, the
L1/L0 coefficient and jumprelu's target k, see COEF and SET) and by SAELens (bench/contenders/saelens_train.py, in
.venv-bench: its `SAETrainer` at its defaults but the same m, k, lr, batch and steps) on the same rows in the same
order, then both are measured on the same held-out rows by sparsecode's CodeStats: FVU, L0, the share of latents
that never fire on them (dead on held-out) and seconds of training. The trainers' own dead share: sparsecode's
`dead` (idle for its dead window, the last line of metrics.jsonl) and SAELens's latents idle for as many steps.

ReLU and JumpReLU are penalised, not held to k: their coefficients (`--coef`, `--peer-coef`) are set so that
held-out L0 ≈ k (within ±15%), found by a small search on full-length runs (L0 at 200 steps did not carry over);
the lr is one value per architecture for both libraries (`--lr`), picked once on 100-step runs.

    .venv/bin/python bench/sae_real.py --store runs/stores/minilm-h [--methods topk relu] [--steps 700]
    .venv/bin/python bench/sae_real.py --store runs/stores/minilm-h --methods relu --steps 200 \
        --coef relu=0.05 --peer-coef relu=1.0    # one point of the L0 search
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparsecode.data.source import SourceConfig, open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, train

# name → (sparsecode method, its coefficient option or None, SAELens architecture)
METHODS = {
    "topk": ("topk", None, "topk"),
    "batchtopk": ("batchtopk", None, "batchtopk"),
    "matryoshka": ("matryoshka", None, "matryoshka_batchtopk"),
    "jumprelu": ("jumprelu", "l0_coef", "jumprelu"),
    "relu": ("relu", "l1_coef", "standard"),
}
# one lr per architecture, the same for both libraries, picked on 100-step runs over 3e-4, 1e-3, 3e-3 (and 1e-2 for
# topk): 3e-3 gave both libraries their lowest held-out FVU on topk, batchtopk and matryoshka but sparsecode's topk at
# 1e-2 (0.190 against 0.258, with 25% dead); see BENCHMARKS.md
LR = {"topk": 3e-3, "batchtopk": 3e-3, "matryoshka": 3e-3, "jumprelu": 3e-3, "relu": 3e-3}
# held-out L0 ≈ 32 (±15%) at 700 steps of 1,024, m = 4,096, lr 3e-3 on minilm-h, found on 700-step runs:
# sparsecode relu on its own schedule (constant lr, unit gradient) l1_coef 0.08 → L0 30.4, 0.082 → 29.9 (seed 0)
# (on the cosine decay before it: 0.13 → 32.3); SAELens standard l1_coefficient 1.5 → 18.1, 1.0 → 30.6;
# SAELens jumprelu l0_coefficient 1 → 10.1, 0.3 → 18.0, 0.15 → 29.5, 0.13 → 33.3, 0.1 → 42.8. sparsecode's
# jumprelu holds its L0 at k = 32 (Gemma Scope 2's target, l0_coef 0.001 → 32.9; 0.0003 → 58.3, 0.01 → 17.7);
# with the plain λ·L0 its L0 did not follow λ at this length
COEF = {"jumprelu": 0.001, "relu": 0.08}  # sparsecode: l0_coef (per row, FVU scale), l1_coef (unitless)
PEER_COEF = {"jumprelu": 0.13, "relu": 1.0}  # SAELens: l0_coefficient, l1_coefficient (summed-MSE scale)
SET: dict[str, dict] = {"jumprelu": {"k": 32}}  # options of sparsecode's methods other than their defaults


def pairs(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if name not in METHODS or not value:
            raise SystemExit(f"expected METHOD=VALUE with METHOD one of {', '.join(METHODS)}, got {item!r}")
        out[name] = float(value)
    return out


def options(items: list[str] | None) -> dict[str, dict]:
    out = {name: dict(opts) for name, opts in SET.items()}
    for item in items or []:
        key, _, value = item.partition("=")
        name, _, option = key.partition(".")
        if name not in METHODS or not option or not value:
            raise SystemExit(f"expected METHOD.KEY=VALUE with METHOD one of {', '.join(METHODS)}, got {item!r}")
        out.setdefault(name, {})[option] = json.loads(value)
    return out


def ours(name: str, args) -> dict:
    method, coef_key, _ = METHODS[name]
    coder = {"m": args.m, coef_key: args.coef[name]} if coef_key else {"m": args.m, "k": args.k}  # penalised: no k
    coder.update(args.set.get(name, {}))
    source = SourceConfig(kind="store", path=str(args.store), heldout=args.heldout, seed=args.seed)
    cfg = TrainConfig(method=method, coder=coder, source=source, steps=args.steps, batch_size=args.batch,
                      lr=args.lr[name], seed=args.seed, log_every=50, ckpt_every=10**9, **args.train)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        coder_ = train(cfg, Path(d) / "run")
        seconds = time.perf_counter() - t0
        last = json.loads((Path(d) / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        resolved = json.loads((Path(d) / "run" / "config.json").read_text())["coder"]
    r = evaluate(coder_, open_source(source, "eval"), rows=args.eval_rows, details=False)
    return {"library": "sparsecode", "method": name, "fvu": r["fvu"], "l0": r["l0"], "dead_heldout": r["never_fired"],
            "dead_trainer": last["dead"], "seconds": seconds, "rows": r["rows"], "lr": args.lr[name],
            "coef": args.coef.get(name) if coef_key else None, "options": args.set.get(name, {}),
            "dead_tokens": resolved.get("dead_tokens")}


def peer(name: str, args, dead_tokens: int | None) -> dict:
    """SAELens on the same rows, steps and held-out rows (its venv)."""
    _, coef_key, arch = METHODS[name]
    window = max(1, -(-(dead_tokens or args.steps * args.batch // 10) // args.batch))  # sparsecode's, in steps
    cmd = [str(args.peer_python), str(Path(__file__).parent / "contenders" / "saelens_train.py"),
           "--store", str(args.store), "--heldout", str(args.heldout), "--seed", str(args.seed), "--arch", arch,
           "-m", str(args.m), "-k", str(args.k), "--steps", str(args.steps), "--batch", str(args.batch),
           "--lr", str(args.lr[name]), "--skip-rows", str(TrainConfig().init_rows), "--eval-rows",
           str(args.eval_rows), "--dead-window-steps", str(window)]
    if coef_key:
        cmd += ["--coef", str(args.peer_coef[name])]
    if args.peer_dead_window == "matched":  # SAELens's AuxK window set to sparsecode's (its default: 1,000 steps)
        cmd += ["--dead-feature-window", str(window)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    library = "SAELens" if args.peer_dead_window == "default" else f"SAELens (dead window {window} steps)"
    return {"library": library, "method": name, "lr": args.lr[name], "coef": args.peer_coef.get(name),
            **json.loads(out)}


def row(r: dict) -> str:
    return (f"| {r['library']} | {r['method']} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_heldout']:.2%} | "
            f"{r['dead_trainer']:.2%} | {r['seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=Path("runs/stores/minilm-h"))
    p.add_argument("--heldout", type=float, default=0.05, help="the store's held-out share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("-m", type=int, default=4096)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--eval-rows", type=int, default=32768)
    p.add_argument("--lr", nargs="*", default=None, metavar="METHOD=LR", help="override the lr of a method")
    p.add_argument("--coef", nargs="*", default=None, metavar="METHOD=C", help="sparsecode's l1_coef / l0_coef")
    p.add_argument("--peer-coef", nargs="*", default=None, metavar="METHOD=C",
                   help="SAELens's l1_coefficient / l0_coefficient")
    p.add_argument("--set", nargs="*", default=None, metavar="METHOD.KEY=VALUE",
                   help="another option of a sparsecode method (default: SET)")
    p.add_argument("--train", nargs="*", default=None, metavar="KEY=VALUE",
                   help="a TrainConfig option of sparsecode's runs other than its default (warmup_steps, decay, ...)")
    p.add_argument("--peer-python", type=Path, default=Path(".venv-bench/bin/python"), help="the venv with SAELens")
    p.add_argument("--peer-dead-window", choices=["default", "matched"], default="default",
                   help="SAELens's dead_feature_window: its default (1,000 steps) or sparsecode's dead window")
    p.add_argument("--only", choices=["sparsecode", "saelens"], default=None, help="run one library only")
    p.add_argument("--json", type=Path, default=None, help="append every result as a JSON line here")
    args = p.parse_args()
    args.lr = {**LR, **pairs(args.lr)}
    args.coef = {**COEF, **pairs(args.coef)}
    args.peer_coef = {**PEER_COEF, **pairs(args.peer_coef)}
    args.set = options(args.set)
    args.train = {k: json.loads(v) if v[:1] in "0123456789-[{" else v
                  for k, _, v in (item.partition("=") for item in args.train or [])}
    if args.only != "sparsecode" and not args.peer_python.exists():
        raise SystemExit(f"{args.peer_python} not found: `make .venv-bench/.installed`, or --only sparsecode")
    print(f"store {args.store}, m = {args.m}, k = {args.k}, {args.steps} steps of {args.batch}, "
          f"held-out rows {args.eval_rows}", flush=True)
    print("| library | method | FVU | L0 | dead on held-out | dead (trainer) | seconds |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    results: dict[tuple[str, str], dict] = {}
    for name in args.methods:
        a = ours(name, args) if args.only != "saelens" else None
        b = peer(name, args, a["dead_tokens"] if a else None) if args.only != "sparsecode" else None
        for r in (a, b):
            if r is None:
                continue
            results[r["library"] == "sparsecode", name] = r
            print(row(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**r, "steps": args.steps, "store": str(args.store)}) + "\n")
    if args.only is None:
        print("\n| method | FVU sparsecode / SAELens | L0 sparsecode / SAELens | "
              "sparsecode: dead ≤ 1% and FVU ≤ SAELens's |")
        print("| --- | ---: | ---: | --- |")
        for name in args.methods:
            a, b = results[True, name], results[False, name]
            ok = a["dead_heldout"] <= 0.01 and a["fvu"] <= b["fvu"]
            print(f"| {name} | {a['fvu'] / b['fvu']:.3f} | {a['l0']:.1f} / {b['l0']:.1f} | {'yes' if ok else 'no'} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
