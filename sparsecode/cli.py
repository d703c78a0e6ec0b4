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
    from .data.source import source_from_spec

    return source_from_spec(spec, dict(_pairs(options, "--source-opt")), seed)


TRAINING_FLAGS = ("steps", "batch_size", "lr", "log_every", "ckpt_every", "device", "precision", "warmup_steps",
                  "decay", "grad_norm", "init_rows", "deterministic")


def requested_config(a: argparse.Namespace, base=None):
    """The TrainConfig the flags ask for: over `base` (a run being resumed) only the flags given apply."""
    from .coder import get_method
    from .config import parse_value
    from .run_config import TrainConfig

    method = a.method or (base.method if base else "topk")
    cls = get_method(method)
    coder: dict[str, Any] = dict(base.coder) if base and method == base.method else {}
    coder.update({k: parse_value(cls.config_class, k, v) for k, v in _pairs(a.set, "--set")})
    for key in ("m", "k"):
        if getattr(a, key) is not None:
            coder[key] = parse_value(cls.config_class, key, str(getattr(a, key)))
    seed = a.seed if a.seed is not None else base.seed if base else 0
    if a.source is not None or a.source_opt or base is None:
        source = source_config(a.source or "synthetic", a.source_opt, seed)
    else:
        source = base.source
    cfg = TrainConfig(**{**(vars(base) if base else {}), "method": method, "coder": coder, "source": source,
                         "seed": seed})
    for key in TRAINING_FLAGS:
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    return cfg


def cmd_train(a: argparse.Namespace) -> int:
    from .distributed import launch_rank
    from .files import check_folder
    from .train import CONFIG, differing_fields, load_config, train

    out = Path(a.out)
    check_folder(out, "run folder")
    if a.resume and not out.is_dir():
        raise SparsecodeError(f"run directory not found: {out}")
    if a.resume and (out / CONFIG).is_file():
        saved = load_config(out)
        cfg = requested_config(a, saved)
        differ = differing_fields(saved, cfg, ignore=("steps",))
        if differ:
            raise SparsecodeError(f"--resume: the flags contradict the run's config ({', '.join(differ)}); "
                                  f"drop them to resume, or train into a new --out")
    else:  # a new run, or one whose writer died before saving its config: start it from the flags
        cfg = requested_config(a)
    if a.hook:  # one coder per hook, from one forward pass per batch: a run folder per hook
        from .multihook import train_hooks

        runs = [out / h for h in train_hooks(cfg, a.hook, out, a.resume, not a.no_progress, a.reshard,
                                             a.hooks_by_rank)]
    else:
        train(cfg, out, resume=a.resume, progress=not a.no_progress, reshard=a.reshard)
        runs = [out]
    for run in runs if launch_rank() == 0 else []:  # under torchrun: once, by the rank that wrote the runs
        print(format_metrics(last_metrics(run)))
        print(f"run written to {run}")
    return 0


def last_metrics(run: Path) -> dict[str, Any]:
    from .files import read_jsonl

    log = Path(run) / "metrics.jsonl"
    records = read_jsonl(log) if log.exists() else []
    return records[-1] if records else {}


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
    from .evaluate import evaluate_run
    from .metrics import flat_metrics

    result = evaluate_run(Path(a.run), a.data, a.rows, a.batch_size, a.splice_contexts)
    of = "fvu of the target (a transcoder; codes of the input): " if result.get("fvu_of") == "target" else ""
    print(json.dumps(result) if a.json else of + format_metrics(flat_metrics(result)))
    return 0


def cmd_diagnose(a: argparse.Namespace) -> int:
    from .evaluate import diagnose_run

    result = diagnose_run(Path(a.run), a.data, a.rows)  # also kept as RUN/diagnosis.json, which --json prints
    print(json.dumps(result) if a.json else result["text"])
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_run, run_eval
    from .report import write_report

    run = Path(a.run)
    if not run.is_dir():
        raise SparsecodeError(f"run directory not found: {run}")
    result = evaluate_run(run, a.data, a.rows) if a.data else run_eval(run, a.rows)
    page = write_report(run, result, Path(a.out) if a.out else None)
    print(f"report written to {page}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .report import compare

    rows = compare([Path(r) for r in a.runs], Path(a.out))
    cols = ["run", "method", "m", "k", "fvu", "l0", "dead", "utilisation", "loss_recovered", "source"]
    table = [cols] + [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"FVU-vs-L0 plot written to {a.out}")
    return 0


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_info(a: argparse.Namespace) -> int:
    from .checkpoint import latest_checkpoint
    from .run_config import load_config

    run = Path(a.run)
    cfg = load_config(run)
    ckpt = latest_checkpoint(run)
    print(f"method: {cfg.method}")
    print(f"coder: {json.dumps(cfg.coder)}")
    if cfg.coder.get("d_out"):
        skip = " with a skip path" if cfg.coder.get("skip") else ""
        print(f"transcoder{skip}: input d_in={cfg.coder.get('d_in')}, target d_out={cfg.coder['d_out']}; "
              f"fvu is of the target")
    print(f"source: {cfg.source.kind} {cfg.source.path or ''} {json.dumps(cfg.source.options)}")
    print(f"training: steps={cfg.steps} batch_size={cfg.batch_size} lr={cfg.lr} seed={cfg.seed}")
    print(f"checkpoint: {ckpt if ckpt else 'none yet'}")
    print(f"last metrics: {format_metrics(last_metrics(run)) or 'none yet'}")
    if cfg.coder.get("sites", 1) > 1 and ckpt:  # a crosscoder: where its live latents write
        from .checkpoint import load_coder
        from .files import read_json
        from .metrics import site_shares

        coder = load_coder(run)
        shares = site_shares(coder.site_norms(), ~coder.dead_mask())
        fvus = read_json(run / "eval.json").get("sites", {}) if (run / "eval.json").is_file() else {}
        print(f"sites: {cfg.coder['sites']}; live latents with > 90% of their decoder norm on one site: "
              f"{', '.join(f'site {k[9:]} {v}' for k, v in shares.items() if k != 'shared')}; shared {shares['shared']}"
              + "".join(f"; held-out fvu site {k[4:]} {v:.4g}" for k, v in fvus.items() if k.startswith("fvu_")))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .interop import check_line, export_run

    r = export_run(Path(a.run), a.to, Path(a.out), a.rows)
    print(f"{check_line(r)} on {r['data']} rows")
    print(f"{r['method']} written as {a.to} to {r['out']}")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from .interop import check_line, import_folder

    r = import_folder(a.src, Path(a.out), a.sae)
    print(check_line(r))
    what, data = (f"a {r['method']} transcoder", "PAIRED_STORE") if r.get("d_out") else (r["method"], "STORE")
    print(f"{r['format']} {r['from']} imported as {what} to {r['out']}; evaluate it with "
          f"`sparsecode eval {r['out']} --data {data}`")
    return 0


def cmd_methods(a: argparse.Namespace) -> int:
    from .coder import methods

    for name, cls in methods().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:18s} {doc}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Harvest MiniLM activations from the embedded corpus, train the default method, evaluate, report."""
    import shutil

    from .data.corpus import open_corpus
    from .data.harvest import HarvestConfig, harvest
    from .data.source import SourceConfig
    from .evaluate import evaluate_run
    from .train import TrainConfig, train

    # named for the corpus too: a store of an older build of the corpus is left as it is, not refused
    store = Path(a.stores) / f"minilm-{a.hook}-{a.tokens}-{open_corpus('stdlib').fingerprint()[:8]}"
    print(f"1/3 harvest: MiniLM-L6 {a.hook} over the Python stdlib docs corpus, {a.tokens} tokens -> {store}")
    harvest(HarvestConfig(out=str(store), model="minilm", hook=a.hook, corpus="stdlib", tokens=a.tokens),
            progress=not a.no_progress)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    cfg = TrainConfig(method="topk", coder={"m": a.m, "k": a.k},
                      source=SourceConfig(kind="store", path=str(store.resolve())),
                      steps=a.steps, batch_size=1024, lr=a.lr, log_every=100)
    print(f"2/3 train: topk (m={a.m}, k={a.k}), {a.steps} steps of 1024 tokens")
    train(cfg, out, progress=not a.no_progress)
    print("3/3 evaluate on the held-out 5% of the store, and splice the code into MiniLM")
    result = evaluate_run(out, rows=65536, splice_contexts=16)
    dead = last_metrics(out)["dead"]
    sp = result["spliced"]
    print(f"FVU {result['fvu']:.4f}  L0 {result['l0']:.1f}  dead {dead:.1%}  "
          f"(not fired on held-out: {result['never_fired']:.1%})")
    clean, spliced, zero = (round(sp[k], 4) + 0.0 for k in ("loss_clean", "loss_spliced", "loss_zero"))  # no -0.0
    print(f"spliced into MiniLM: {sp['metric']} clean {clean:.4f}, spliced {spliced:.4f}, "
          f"zero-ablated {zero:.4f} -> loss recovered {sp['loss_recovered']:.1%}")
    print(f"run written to {out} (eval.json, metrics.jsonl, checkpoints/)")
    print(f"next: sparsecode report {out}    (HTML page with the curves and the frequency histogram)\n"
          f"      sparsecode diagnose {out}    (what collapsed, why, and what to change)\n"
          f"      sparsecode eval {out} --json    (every held-out figure)\n"
          f"      sparsecode steer {out} --prompt \"def read the file\" --feature 5 --scale 8    (steer a feature)\n"
          f"      sparsecode ablate {out} --prompt \"def read the file\" --feature 5    (its effect per token)\n"
          f"      sparsecode features {out} && sparsecode browse {out}    (explore every feature in a browser)\n"
          f"      sparsecode train --out {out} --resume --steps {2 * a.steps}    (train it further)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sparsecode", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    t = sub.add_parser("train", help="train a method on an activation source")
    t.add_argument("--method", help="a registered method (see `sparsecode methods`; default topk)")
    t.add_argument("--source", help="synthetic (default) | clusters | hierarchical | model (on the fly) | "
                                     "a store folder | path/to/acts.npy")
    t.add_argument("--source-opt", action="append", metavar="KEY=VALUE", help="an option of the source")
    t.add_argument("-m", type=int, help="dictionary / codebook size")
    t.add_argument("-k", type=int, help="active atoms per token (sparse methods)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other option of the method")
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup-steps", type=int, help="default: the method's (10 for most)")
    t.add_argument("--decay", help="cosine | linear | constant; default: the method's (cosine for most)")
    t.add_argument("--grad-norm", help="clip (at 1.0) | unit (every step's gradient at norm 1); default: the method's")
    t.add_argument("--init-rows", type=int, help="rows the start is fitted to (k-means, b_dec); default: 8 per code "
                   "for k-means codebooks, else 16,384")
    t.add_argument("--seed", type=int, help="default 0")
    t.add_argument("--log-every", type=int)
    t.add_argument("--ckpt-every", type=int)
    t.add_argument("--device", help="auto | cpu | cuda[:N]")
    t.add_argument("--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16")
    t.add_argument("--deterministic", action="store_const", const=True,
                   help="deterministic kernels: bit-exact resume on CUDA too (slower); CPU runs always are")
    t.add_argument("--hook", action="append", help="with --source model: a module (or a pattern, 'transformer.h.*')"
                                                   " to train a coder of, each in OUT/HOOK, all from one forward pass")
    t.add_argument("--hooks-by-rank", action="store_true", help="with several --hook under torchrun: rank r trains "
                   "hooks r, r+N, ... and the ranks share the forward passes (default: each rank every hook)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--reshard", action="store_true",
                   help="resume a run saved by another number of torchrun ranks (`torchrun --nproc-per-node N -m "
                        "sparsecode train ...` trains on N ranks)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="metrics of a saved run on held-out data")
    e.add_argument("run")
    e.add_argument("--data", help="a .npy file or store to evaluate on instead of the run's held-out split")
    e.add_argument("--splice-contexts", type=int, default=16,
                   help="contexts for the spliced downstream loss (store runs; 0 = skip)")
    e.add_argument("--rows", type=int, default=65536)
    e.add_argument("--batch-size", type=int, default=4096)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("diagnose", help="what collapsed in a run, the likely cause and the change to make")
    g.add_argument("run")
    g.add_argument("--data", help="a .npy file or store to read rows from instead of the run's held-out split")
    g.add_argument("--rows", type=int, default=4096, help="held-out rows to check the code on")
    g.add_argument("--json", action="store_true", help="print the diagnosis as kept in RUN/diagnosis.json")
    g.set_defaults(fn=cmd_diagnose)

    r = sub.add_parser("report", help="write a self-contained HTML report of a run (plots included)")
    r.add_argument("run")
    r.add_argument("--out", help="report folder (default RUN/report)")
    r.add_argument("--rows", type=int, default=65536, help="held-out rows if the run has no eval.json yet")
    r.add_argument("--data", help="evaluate on this .npy file or store first (an imported run has no held-out split)")
    r.set_defaults(fn=cmd_report)

    c = sub.add_parser("compare", help="table of several runs and an FVU-vs-L0 plot")
    c.add_argument("runs", nargs="+")
    c.add_argument("--out", default="compare.png")
    c.set_defaults(fn=cmd_compare)

    i = sub.add_parser("info", help="config and last metrics of a run")
    i.add_argument("run")
    i.set_defaults(fn=cmd_info)

    sub.add_parser("methods", help="list the registered methods").set_defaults(fn=cmd_methods)

    x = sub.add_parser("export", help="write a run as SAELens, sparsify or dictionary_learning files, checked")
    x.add_argument("run")
    x.add_argument("--to", required=True, choices=["saelens", "sparsify", "dictionary_learning"])
    x.add_argument("--out", required=True, help="a new folder")
    x.add_argument("--rows", type=int, default=65536, help="held-out rows for SAELens's firing densities")
    x.set_defaults(fn=cmd_export)

    m = sub.add_parser("import", help="make a run of a SAELens, sparsify or dictionary_learning SAE, checked")
    m.add_argument("src", help="a folder (or a Hugging Face repo id) holding the SAE or a release of several")
    m.add_argument("--out", required=True, help="the new run folder")
    m.add_argument("--sae", help="the subfolder of the SAE to import from a release folder holding several")
    m.set_defaults(fn=cmd_import)

    from .steer import add_intervention_commands

    add_intervention_commands(sub)

    from .browse import add_feature_commands
    from .data.harvest import add_harvest_command

    add_harvest_command(sub)
    add_feature_commands(sub)

    d = sub.add_parser("demo", help="harvest MiniLM activations, train the default method, evaluate")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--stores", default="runs/stores", help="folder of harvested stores (reused when complete)")
    d.add_argument("--hook", default="encoder.layer.3")
    d.add_argument("--tokens", type=int, default=200_000)
    d.add_argument("-m", type=int, default=3072)
    d.add_argument("-k", type=int, default=32)
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)
    return p


RESUME_HINT = {"train": "the run resumes from its last checkpoint with the same command and --resume",
               "harvest": "run the same harvest command again to resume it",
               "features": "run the same features command again to resume it",
               "demo": "run it again: the harvest resumes and the run starts afresh"}


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: what failed and on which path."""
    what = e.strerror or str(e) or type(e).__name__
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{what}: {where}" if where else what


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return args.fn(args)
    except SparsecodeError as e:
        print(f"sparsecode: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk, a path that is a file...: nothing half-written
        print(f"sparsecode: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = RESUME_HINT.get(command)
        print(f"sparsecode: interrupted{f' ({hint})' if hint else ''}", file=sys.stderr)
        return 130

