"""Harvest a Hugging Face model's activations at one module into a sharded store (`sparsecode harvest`).

The hooked module's output (or input) is kept for every content token of the packed contexts (see
`contexts.py`). Contexts run in fixed batches from the corpus start, so a resumed harvest recomputes exactly
the batch it stopped in and the store equals a straight run's. With `target` (a second module, `--target`,
and its `--target-point`) both sites are captured in the same forward pass and the target's rows are stored
beside `acts` under the key `target`, row for row: a paired store for transcoders. With `hooks` (several modules,
each `--hook`, all at `hook_point`) every site is captured in the same pass and stored side by side in `acts`
([rows, Σ widths], the sites in order), the manifest's `sites` listing each (module, point, width): a store for
crosscoders.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..config import check, positive
from ..device import pick_device
from ..errors import SparsecodeError
from ..files import atomic_write_json, writing
from ..model import Hooked, _Stop, find_module, load_model
from .contexts import Layout, ModelSpec, batches, pack, run_contexts
from .corpus import Corpus, open_corpus
from .store import DTYPES, FORMATS, MANIFEST, VERSION, StoreWriter, check_store_folder, has_shards, part_name


@dataclass
class HarvestConfig(ModelSpec):
    """A harvest: a ModelSpec, how many tokens, and how the store is written."""

    out: str = ""
    tokens: int = 1_000_000
    dtype: str = "fp16"
    file_format: str = "safetensors"
    shard_tokens: int = 131072

    def validate(self) -> None:
        super().validate()
        check(bool(self.out), "a harvest needs an output folder (--out)")
        positive(self, "tokens")
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.file_format in FORMATS, f"format must be one of {', '.join(FORMATS)}, got {self.file_format!r}")
        positive(self, "shard_tokens")


def harvest(cfg: HarvestConfig, progress: bool = False,
            on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Harvest (or finish harvesting) `cfg` into cfg.out; returns the store's manifest.

    `on_shard(n)` runs after each shard is written (n = shards so far in this call). Under torchrun the context
    batches are dealt out to the ranks (`_harvest_split`).
    """
    cfg = replace(cfg, hook=cfg.hooks[0]) if cfg.hooks else cfg  # a crosscoder's store: `hook` names its first site
    cfg.validate()
    with distributed.launched(cfg.device):
        corpus = open_corpus(cfg.corpus, cfg.text_field)
        device = distributed.local_device(pick_device(cfg.device))
        model, tokenizer, revision = load_model(cfg.model, cfg.revision, device, cfg.tokenizer)
        sites = cfg.sites()
        hooked = Paired(model, sites) if sites else Hooked(model, cfg.hook, cfg.hook_point)
        layout = Layout.of(tokenizer, cfg.context, cfg.prepend_bos)
        # a store without a target or several hooks keeps the old header
        unpaired = (() if cfg.target else ("target", "target_point")) + (() if cfg.hooks else ("hooks",))
        header = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "tokens", *unpaired)}
        header.update(model_revision=revision, corpus_fingerprint=corpus.fingerprint(), tokens_requested=cfg.tokens)
        out, run = Path(cfg.out), (cfg, corpus, tokenizer, hooked, layout, progress, on_shard)
        check_store_folder(out, distributed.world())  # a folder of other files gets no lock file either
        if distributed.world() > 1:
            return _harvest_split(out, header, *run)
        with writing(out, "store", keep=lambda: has_shards(out)):  # everything above was checked before this
            return _harvest_into(StoreWriter(out, header, cfg.shard_tokens), *run)


def _harvest_split(out: Path, header: dict[str, Any], cfg: HarvestConfig, *run: Any) -> dict[str, Any]:
    """One rank of a harvest under torchrun: rank r of N runs the context batches i ≡ r (mod N) into its own
    store in OUT/rank-r-of-N (resumable like any store), then rank 0 writes OUT's manifest listing every rank's
    shards, rank by rank. A killed split harvest resumes with the same number of ranks (other numbers are refused)."""
    rank, ranks = distributed.rank(), distributed.world()
    if (out / MANIFEST).is_file():  # complete (the same settings, checked), or a one-process harvest's
        done = StoreWriter(out, header, cfg.shard_tokens)
        check(done.complete, f"{out} holds an unfinished one-process harvest; finish it without torchrun")
        distributed.barrier()
        return done.manifest
    part = out / part_name(rank, ranks)
    with writing(out, "store", keep=lambda: any(has_shards(p) for p in out.glob("rank-*"))) if rank == 0 \
            else nullcontext():
        distributed.barrier()  # rank 0 holds the store's lock before any rank writes in it
        with writing(part, "store part", keep=lambda: has_shards(part)):
            mine = _harvest_into(StoreWriter(part, {**header, "part": [rank, ranks]}, cfg.shard_tokens), cfg, *run)
        parts = distributed.gather_objects(mine)
        shards = [{"name": f"{part_name(r, ranks)}/{s['name']}", "rows": s["rows"],
                   "sha256": {f"{part_name(r, ranks)}/{f}": h for f, h in s["sha256"].items()}}
                  for r, m in enumerate(parts) for s in m["shards"]]
        check(bool(shards), f"the harvest into {out} produced no tokens")
        widths = next(m for m in parts if m["shards"])
        manifest = {"version": VERSION, **header, "d": widths["d"], "complete": True,
                    "tokens": sum(s["rows"] for s in shards), "shards": shards, "resume": None, "ranks": ranks,
                    **{k: widths[k] for k in ("d_out", "sites") if k in widths}}
        if rank == 0:
            atomic_write_json(out / MANIFEST, manifest)
        distributed.barrier()  # no rank returns before the store is complete
        return manifest


def _harvest_into(writer: StoreWriter, cfg: HarvestConfig, corpus: Corpus, tokenizer: Any, hooked: Hooked,
                  layout: Layout, progress: bool, on_shard: Callable[[int], None] | None) -> dict[str, Any]:
    """Harvest into `writer`; under torchrun (a rank's part) only the context batches i ≡ rank (mod ranks)."""
    from tqdm import tqdm

    if writer.complete:
        return writer.manifest
    rank, ranks = distributed.rank(), distributed.world()
    resume = writer.manifest["resume"] or {"cursor": [0, 0], "row": 0}
    # row: the store's rows before the current batch; local: this rank's (a part holds only its batches)
    row, local, first = resume["row"], resume.get("local", resume["row"]), resume.get("group", 0)
    skip = writer.rows - local
    bar = tqdm(total=cfg.tokens, initial=row, unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not progress or rank > 0, desc="harvest")
    shards = 0
    contexts = pack(corpus, tokenizer, layout, tuple(resume["cursor"]))
    for i, group in enumerate(batches(contexts, cfg.batch_contexts, cfg.tokens - row), first):
        n = min(sum(c.kept for c in group), cfg.tokens - row)  # the batch's rows, the last batch cut to the total
        if i % ranks != rank:  # another rank's batch
            row += n
            bar.update(n)
            continue
        rows = run_contexts(hooked, group)
        if cfg.target:  # [rows, d_in + d_out]: the input's columns, then the target's
            rows["target"] = rows["acts"][:, hooked.widths[0]:]
            rows["acts"] = rows["acts"][:, :hooked.widths[0]]
        elif cfg.hooks:  # [rows, Σ widths]: each site's columns in turn, listed in the manifest
            writer.manifest["sites"] = [{"module": h, "point": cfg.hook_point, "width": w}
                                        for h, w in zip(cfg.hooks, hooked.widths, strict=True)]
        new = {k: v[skip:n] for k, v in rows.items()}
        split = {"group": i, "local": local} if ranks > 1 else {}
        written = writer.add(new, {"cursor": list(group[0].cursor), "row": row, **split})
        row, local, skip = row + n, local + n, 0
        bar.update(n)
        for _ in range(written):
            shards += 1
            if on_shard is not None:
                on_shard(shards)
    bar.close()
    return writer.finish(empty=ranks > 1)


class Paired:
    """Runs token batches up to the last of several sites (module, output|input) and returns their activations side
    by side, [B, T, Σ widths] in the order given (each site's width in `widths`), float32 on the CPU: a transcoder's
    input and target, or a crosscoder's sites."""

    def __init__(self, model: Any, sites: list[tuple[str, str]]):
        self.model, self.device = model, next(model.parameters()).device
        self.names = [name for name, _ in sites]
        self.sites = [(find_module(model, name), point) for name, point in sites]
        self.widths: list[int] = []

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen: dict[int, torch.Tensor] = {}

        def grab(i: int, x: Any) -> None:
            seen.setdefault(i, (x[0] if isinstance(x, tuple) else x).clone())
            if len(seen) == len(self.sites):
                raise _Stop

        handles = []
        for i, (module, point) in enumerate(self.sites):
            if point == "output":
                handles.append(module.register_forward_hook(lambda m, args, out, i=i: grab(i, out)))
            else:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i: grab(i, args[0] if args else kwargs.get(
                        "hidden_states", next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))),
                    with_kwargs=True))
        try:
            self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [name for i, name in enumerate(self.names) if i not in seen]
        if missing:
            raise SparsecodeError(f"{', '.join(missing)} did not run in the forward pass; pick another --hook/--target")
        parts = [seen[i].reshape(*ids.shape, -1).float().cpu() for i in range(len(self.sites))]
        self.widths = [p.shape[-1] for p in parts]
        return torch.cat(parts, -1)


# --- command line ---------------------------------------------------------------------------------
def _count(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_harvest_command(sub: Any) -> argparse.ArgumentParser:
    """Add `sparsecode harvest` to the CLI's subparsers; the defaults are HarvestConfig's (flags left out
    keep them)."""
    d = HarvestConfig()
    h = sub.add_parser("harvest", help="store a model's activations at one module (or several) over a corpus")
    h.add_argument("--model", help=f"hub id, local folder, or 'minilm' (embedded; default {d.model})")
    h.add_argument("--hook", action="append", help=f"module path, e.g. encoder.layer.3 or transformer.h.6 (default "
                                                   f"{d.hook}); several: a crosscoder's sites, stored side by side")
    h.add_argument("--hook-point", choices=["output", "input"], help=f"default {d.hook_point}")
    h.add_argument("--target", help="a second module stored beside --hook in the same pass (a transcoder's target)")
    h.add_argument("--target-point", choices=["output", "input"], help=f"of --target (default {d.target_point})")
    h.add_argument("--corpus", help=f"'stdlib' (embedded), a folder or glob of .txt/.jsonl, a saved dataset, or a "
                                    f"dataset id (default {d.corpus})")
    h.add_argument("--text-field", help=f"text column of .jsonl files and datasets (default {d.text_field})")
    h.add_argument("--tokens", type=_count, help=f"tokens to store, e.g. 1e6 (default {d.tokens})")
    h.add_argument("--context", type=int, help=f"tokens per context (default {d.context})")
    h.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction,
                   help="prepend BOS to each context of a model that adds no special tokens (default on)")
    h.add_argument("--dtype", choices=list(DTYPES), help=f"default {d.dtype}")
    h.add_argument("--format", dest="file_format", choices=list(FORMATS), help=f"default {d.file_format}")
    h.add_argument("--shard-tokens", type=_count, help=f"rows per shard (default {d.shard_tokens})")
    h.add_argument("--batch-contexts", type=int, help=f"contexts per forward pass (default {d.batch_contexts})")
    h.add_argument("--revision", help="hub revision (branch, tag or commit)")
    h.add_argument("--tokenizer", help="hub id or folder of the tokenizer (for a model folder without one)")
    h.add_argument("--device", help=f"auto | cpu | cuda[:N] (default {d.device})")
    h.add_argument("--out", required=True, help="store folder (an interrupted harvest resumes in it)")
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(fn=cmd_harvest)
    return h


def cmd_harvest(a: argparse.Namespace) -> int:
    hooks = a.hook or []
    a.hook, a.hooks = (hooks[0] if hooks else None), (hooks if len(hooks) > 1 else None)
    cfg = HarvestConfig(**{f.name: getattr(a, f.name) for f in fields(HarvestConfig)
                           if getattr(a, f.name, None) is not None})
    m = harvest(cfg, progress=not a.no_progress)
    short = "" if m["tokens"] >= cfg.tokens else f" (the corpus ran out before {cfg.tokens})"
    pair = f" → {cfg.target} ({cfg.target_point}, d_out={m['d_out']})" if cfg.target else ""
    hook = " + ".join(cfg.hooks) if cfg.hooks else cfg.hook
    if distributed.launch_rank() == 0:  # under torchrun: once
        print(f"stored {m['tokens']} tokens{short} of {cfg.model} {hook} ({cfg.hook_point}, d={m['d']}{pair}, "
              f"{m['dtype']}) in {len(m['shards'])} shards: {cfg.out}")
    return 0
