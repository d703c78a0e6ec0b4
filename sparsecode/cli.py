"""The `sparsecode` command line: train, eval, info, methods, demo. User errors: one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import SparsecodeError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, like every other user error
        raise SparsecodeError(f"{self.prog}: {message}")


def _pairs(items: list[str] | None, what: str) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise SparsecodeError(f"{what} expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out


def source_config(spec: str, options: list[str] | None, seed: int):
    """`synthetic`, `clusters` or a path to a .npy file, with `key=value` options for synthetic kinds."""
    from .config import parse_value
    from .data.source import SourceConfig
    from .data.synthetic import ClustersConfig, SparseFeaturesConfig

    kinds = {"synthetic": SparseFeaturesConfig, "clusters": ClustersConfig}
    if spec in kinds:
        opts = {k: parse_value(kinds[spec], k, v) for k, v in _pairs(options, "--source-opt")}
        return SourceConfig(kind=spec, options=opts, seed=seed)
    if options:
        raise SparsecodeError(f"--source-opt applies to synthetic sources, not to {spec!r}")
    path = Path(spec)
    if path.suffix == ".npy":
        if not path.is_file():
            raise SparsecodeError(f"activation file not found: {path}")
        return SourceConfig(kind="npy", path=str(path.resolve()), seed=seed)
    raise SparsecodeError(f"--source must be 'synthetic', 'clusters' or a .npy file, got {spec!r}")


def cmd_train(a: argparse.Namespace) -> int:
    from .coder import get_method
    from .config import parse_value
    from .train import TrainConfig, load_config, train

    out = Path(a.out)
    if a.resume:
        cfg = load_config(out)
        if a.steps is not None:
            cfg.steps = a.steps
    else:
        cls = get_method(a.method)
        coder: dict[str, Any] = {k: parse_value(cls.config_class, k, v) for k, v in _pairs(a.set, "--set")}
        for key in ("m", "k"):
            if getattr(a, key) is not None:
                coder[key] = parse_value(cls.config_class, key, str(getattr(a, key)))
        cfg = TrainConfig(method=a.method, coder=coder, source=source_config(a.source, a.source_opt, a.seed),
                          seed=a.seed)
        for key in ("steps", "batch_size", "lr", "log_every", "ckpt_every", "device", "warmup_steps"):
            if getattr(a, key) is not None:
                setattr(cfg, key, getattr(a, key))
    train(cfg, out, resume=a.resume, progress=not a.no_progress)
    print(format_metrics(last_metrics(out)))
    print(f"run written to {out}")
    return 0


def last_metrics(run: Path) -> dict[str, Any]:
    log = Path(run) / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1]) if lines else {}


def format_metrics(m: dict[str, Any]) -> str:
    order = ["step", "fvu", "l0", "dead", "utilisation", "perplexity", "dense", "recovered", "mean_best_cos",
             "tokens_per_s"]
    parts = []
    for key in order + sorted(set(m) - set(order)):
        if key in m:
            v = m[key]
            share = key in ("dead", "utilisation", "dense", "recovered", "never_fired")
            parts.append(f"{key}={v:.1%}" if share else f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}")
    return "  ".join(parts)


def cmd_eval(a: argparse.Namespace) -> int:
    from .checkpoint import load_coder
    from .data.source import open_source
    from .evaluate import evaluate
    from .train import load_config

    run = Path(a.run)
    cfg = load_config(run)
    coder = load_coder(run)
    if a.data:
        src_cfg = source_config(a.data, None, cfg.source.seed)
        src_cfg.heldout = 0.0
        source = open_source(src_cfg, "train")
    elif cfg.source.kind == "memory":
        raise SparsecodeError(f"run {run} was trained on in-memory data; evaluate it with --data FILE.npy")
    else:
        source = open_source(cfg.source, "eval")
    result = evaluate(coder, source, rows=a.rows, batch_size=a.batch_size)
    print(json.dumps(result) if a.json else format_metrics(result))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .checkpoint import latest_checkpoint
    from .train import load_config

    run = Path(a.run)
    cfg = load_config(run)
    ckpt = latest_checkpoint(run)
    print(f"method: {cfg.method}")
    print(f"coder: {json.dumps(cfg.coder)}")
    print(f"source: {cfg.source.kind} {cfg.source.path or ''} {json.dumps(cfg.source.options)}")
    print(f"training: steps={cfg.steps} batch_size={cfg.batch_size} lr={cfg.lr} seed={cfg.seed}")
    print(f"checkpoint: {ckpt if ckpt else 'none yet'}")
    print(f"last metrics: {format_metrics(last_metrics(run)) or 'none yet'}")
    return 0


def cmd_methods(a: argparse.Namespace) -> int:
    from .coder import methods

    for name, cls in methods().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:12s} {doc}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Train the default method on the embedded data and print a short report."""
    import shutil

    from .data.source import SourceConfig, open_source
    from .evaluate import evaluate
    from .train import TrainConfig, train

    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(method="topk", coder={"m": 512, "k": 6, "dead_tokens": 100_000},
                      source=SourceConfig(kind="synthetic", options={"d": 64, "n_features": 256, "active": 3}),
                      steps=a.steps, batch_size=1024, lr=2e-3)
    print(f"training topk (m=512, k=6) on synthetic superposition data (d=64, 256 true features), "
          f"{cfg.steps} steps")
    coder = train(cfg, out, progress=not a.no_progress)
    result = evaluate(coder, open_source(cfg.source, "eval"), rows=32768)
    print("held-out: " + format_metrics(result))
    print(f"FVU {result['fvu']:.4f}  L0 {result['l0']:.2f}  dead {last_metrics(out)['dead']:.1%}  "
          f"recovered {result['recovered']:.1%} of true features")
    print(f"run written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sparsecode", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a method on an activation source")
    t.add_argument("--method", default="topk", help="a registered method (see `sparsecode methods`)")
    t.add_argument("--source", default="synthetic", help="synthetic | clusters | path/to/acts.npy")
    t.add_argument("--source-opt", action="append", metavar="KEY=VALUE", help="synthetic source option")
    t.add_argument("-m", type=int, help="dictionary / codebook size")
    t.add_argument("-k", type=int, help="active atoms per token (sparse methods)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other option of the method")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup-steps", type=int)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int)
    t.add_argument("--ckpt-every", type=int)
    t.add_argument("--device", help="auto | cpu | cuda[:N]")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="metrics of a saved run on held-out data")
    e.add_argument("run")
    e.add_argument("--data", help="a .npy file to evaluate on instead of the run's held-out split")
    e.add_argument("--rows", type=int, default=65536)
    e.add_argument("--batch-size", type=int, default=4096)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("info", help="config and last metrics of a run")
    i.add_argument("run")
    i.set_defaults(fn=cmd_info)

    sub.add_parser("methods", help="list the registered methods").set_defaults(fn=cmd_methods)

    d = sub.add_parser("demo", help="train the default method on the embedded data and report")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=1500)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except SparsecodeError as e:
        print(f"sparsecode: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsecode: interrupted (a run resumes from its last checkpoint with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
