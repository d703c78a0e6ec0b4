"""Token contexts: documents tokenised and packed into fixed-size contexts with the model's special tokens,
run through a hooked model in groups, the kept positions' activations returned with their token ids.

Documents are tokenised without special tokens and concatenated, a separator (EOS, else SEP) after each,
then cut into contexts of `context` tokens: the model's own special tokens around each context ([CLS] ...
[SEP] for BERT; BOS prepended for models that add none, as SAELens does), padding after the corpus's last
one. The positions of BOS, CLS, SEP, separators and padding are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import check, positive
from ..model import Hooked
from .corpus import DEFAULT_CORPUS, Corpus

DEFAULT_MODEL, DEFAULT_HOOK = "minilm", "encoder.layer.3"


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
    target: str = ""  # a second module whose activations follow the hook's in each row (a transcoder's target)
    target_point: str = "output"  # output | input of the target module
    # a crosscoder's sites: modules side by side in each row, each at hook_point (the first is `hook`); []: one
    hooks: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check(self.hook_point in ("output", "input"), f"hook point must be output or input, got {self.hook_point!r}")
        check(self.context >= 2, f"context must be at least 2, got {self.context}")
        positive(self, "batch_contexts")
        check(not self.hooks or len(self.hooks) >= 2, f"hooks lists a crosscoder's sites: give two or more, got "
                                                      f"{self.hooks}")
        check(len(set(self.hooks)) == len(self.hooks), f"a --hook is given twice: {', '.join(self.hooks)}")
        check(not (self.hooks and self.target), "several --hook (a crosscoder's sites) and --target (a transcoder's) "
                                                "do not go together")
        check(self.target_point in ("output", "input"),
              f"target point must be output or input, got {self.target_point!r}")
        check(bool(self.target) or self.target_point == "output", "--target-point needs a --target")

    def sites(self) -> list[tuple[str, str]]:
        """The (module, point) sites one forward pass captures side by side: a transcoder's input and target, a
        crosscoder's hooks; [] for the one hook."""
        if self.target:
            return [(self.hook, self.hook_point), (self.target, self.target_point)]
        return [(h, self.hook_point) for h in self.hooks]


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
