"""A MiniLM MLP transcoder beside the plain SAE of the same site (issue 18), on the stdlib corpus.

The MLP of `encoder.layer.3` reads `intermediate`'s input and writes `output.dense`'s output. Two stores are
harvested from the same tokens: a paired one (input → MLP output) and a plain one of the MLP output. On them
TopK at the same m, k, steps, batch and lr: a transcoder, a skip transcoder, and the plain SAE of the MLP output.
Each is scored on its store's held-out rows (FVU of the MLP output, L0, dead) and spliced into MiniLM with the MLP
output replaced (eval's spliced figures: the model's own loss with the site replaced, and its recovery).

    .venv/bin/python bench/transcoder_real.py --tokens 400000 --steps 400 -m 4096 -k 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparsecode.data.harvest import HarvestConfig, harvest
from sparsecode.data.source import SourceConfig
from sparsecode.evaluate import evaluate_run
from sparsecode.train import TrainConfig, train

LAYER = "encoder.layer.3"
MLP_IN, MLP_OUT = f"{LAYER}.intermediate", f"{LAYER}.output.dense"


def stores(root: Path, tokens: int) -> tuple[Path, Path]:
    """The paired store (MLP input → output) and the store of the MLP output, harvested once."""
    paired, plain = root / "minilm-mlp3-paired", root / "minilm-mlp3-out"
    common = dict(model="minilm", corpus="stdlib", tokens=tokens, device="cpu")
    if not (paired / "manifest.json").is_file():
        harvest(HarvestConfig(out=str(paired), hook=MLP_IN, hook_point="input", target=MLP_OUT, **common))
    if not (plain / "manifest.json").is_file():
        harvest(HarvestConfig(out=str(plain), hook=MLP_OUT, hook_point="output", **common))
    return paired, plain


def run_one(name: str, store: Path, coder: dict, a: argparse.Namespace, out: Path) -> dict:
    run = out / name.replace(" ", "-")
    src = SourceConfig(kind="store", path=str(store.resolve()), heldout=a.heldout, seed=a.seed)
    cfg = TrainConfig(method="topk", coder={"m": a.m, "k": a.k, **coder}, source=src, steps=a.steps,
                      batch_size=a.batch, lr=a.lr, seed=a.seed, log_every=50, ckpt_every=a.steps, device="cpu")
    t0 = time.perf_counter()
    train(cfg, run)
    seconds = time.perf_counter() - t0
    r = evaluate_run(run, rows=a.eval_rows, splice_contexts=a.splice_contexts)
    spliced = r.get("spliced", {})
    return {"run": name, "fvu": r["fvu"], "fvu_of": r.get("fvu_of"), "l0": r["l0"], "dead": r["never_fired"],
            "spliced": spliced, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("runs/stores"))
    p.add_argument("--out", type=Path, default=Path("runs/bench-transcoder"))
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--heldout", type=float, default=0.1)
    p.add_argument("-m", type=int, default=4096)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=32768)
    p.add_argument("--splice-contexts", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="append every result as a JSON line here")
    a = p.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        raise SystemExit(f"{a.out} exists and is not empty; pick another --out")
    paired, plain = stores(a.root, a.tokens)
    runs = [("transcoder", paired, {}), ("skip transcoder", paired, {"skip": True}),
            ("SAE of the MLP output", plain, {})]
    results = [run_one(name, store, coder, a, a.out) for name, store, coder in runs]
    print(f"MiniLM {LAYER} MLP ({MLP_IN} input → {MLP_OUT} output), {a.tokens} tokens of stdlib, "
          f"TopK m = {a.m}, k = {a.k}, {a.steps} steps of {a.batch}, lr {a.lr}")
    print("| coder | FVU of the MLP output | L0 | never fired on held-out | spliced 1 − cos | clean "
          "| MLP output zeroed | recovered | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        s = r["spliced"]
        cells = [f"{s.get(k, float('nan')):.4f}" for k in ("loss_spliced", "loss_clean", "loss_zero", "loss_recovered")]
        print(f"| {r['run']} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead']:.2%} | {' | '.join(cells)} | "
              f"{r['seconds']:.0f} |")
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({**r, "tokens": a.tokens, "m": a.m, "k": a.k, "steps": a.steps}) + "\n")


if __name__ == "__main__":
    main()
