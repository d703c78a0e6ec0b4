"""Source kind `model`: activations computed on the fly from a model and a corpus, with no store.

Contexts are packed and run exactly as `harvest` does. Rows are mixed through a window buffer: the rows
of `buffer_rows / context` consecutive contexts are gathered, shuffled (by seed, epoch and window) and
handed out in that order, so a batch draws from dozens of documents rather than one. At the corpus end
the next epoch starts again from its beginning. Documents are split between `train` and `eval` by a hash
of their index (the `eval` share is SourceConfig.heldout).

Resuming restores (epoch, window index, the corpus cursor where the window starts, position inside the
window). The window's rows are recomputed from that cursor (one window's forward passes) and reshuffled
with the same generator seed, so the stream continues with exactly the rows it would have given.

Like `harvest`, one forward pass can feed several sites: with `target` (a transcoder's) the rows are [input,
target] (`d` + `d_out` wide), with `hooks` (a crosscoder's sites, each at `hook_point`) the sites side by side
(`site_widths`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..config import check, derive_seed, from_dict, positive
from ..device import pick_device
from ..model import Hooked, load_model, match_modules
from .contexts import Context, Layout, ModelSpec, pack, run_contexts
from .corpus import open_corpus
from .source import SourceConfig, register_source


@dataclass
class StreamConfig(ModelSpec):
    """Options of source kind `model` (SourceConfig.options): a ModelSpec and the mixing buffer."""

    buffer_rows: int = 16384  # rows mixed together

    def validate(self) -> None:
        super().validate()
        positive(self, "buffer_rows")


class ModelStream:
    """An endless, resumable stream of a model's activations over a corpus."""

    def __init__(self, cfg: StreamConfig, seed: int = 0, split: str = "train", heldout: float = 0.05,
                 hooks: list[str] | None = None, spread: bool = False):
        """`hooks`: module paths or patterns ('transformer.h.*', `match_modules`) captured in the same forward pass
        instead of cfg.hook, their rows side by side ([n, Σ widths], the hooks in model order; each one's
        width in `widths`). Each hook's columns are the rows a stream of that hook alone gives. `spread`: under
        torchrun the ranks share each window's forward passes (`_run`); every rank gets every row."""
        from .harvest import Paired

        self.cfg, self.seed = cfg, seed
        self.spread = (distributed.rank(), distributed.world()) if spread and distributed.world() > 1 else None
        self.corpus = open_corpus(cfg.corpus, cfg.text_field)
        device = distributed.local_device(pick_device(cfg.device))
        self.model, self.tokenizer, _ = load_model(cfg.model, cfg.revision, device, cfg.tokenizer)
        check(not hooks or not (cfg.target or cfg.hooks), "one coder per hook takes a source of one site, without "
                                                         "target or hooks")
        self.hooks = match_modules(self.model, hooks) if hooks else [cfg.hook]
        sites = [(h, cfg.hook_point) for h in self.hooks] if hooks else cfg.sites()
        self.hooked = Paired(self.model, sites) if sites else Hooked(self.model, cfg.hook, cfg.hook_point)
        self.layout = Layout.of(self.tokenizer, cfg.context, cfg.prepend_bos)
        share = int(round(heldout * 10000))
        self.keep_doc = lambda i: (zlib.crc32(str(i).encode()) % 10000 < share) == (split == "eval")
        probe = torch.tensor([self.layout.prefix + [self.layout.pad] + self.layout.suffix])
        self.d = int(self.hooked(probe, torch.ones_like(probe)).shape[-1])
        self.widths = list(self.hooked.widths) if sites else [self.d]
        self.d_out, self.site_widths = 0, tuple(self.widths) if cfg.hooks else ()
        if cfg.target:  # rows [input, target]: `d` is the input's width, as a paired store's
            self.d, self.d_out = self.widths
        self.window_contexts = max(1, -(-cfg.buffer_rows // self.layout.content))
        self.epoch, self.window, self.cursor, self.pos = 0, 0, (0, 0), 0
        self._rows: Tensor | None = None  # the current window, shuffled
        self._contexts: Iterator[Context] | None = None

    def _fill(self) -> None:
        """Compute and shuffle the window starting at self.cursor (next epoch if the corpus is done)."""
        if self._contexts is None:
            self._contexts = pack(self.corpus, self.tokenizer, self.layout, self.cursor, self.keep_doc)
        group = [c for _, c in zip(range(self.window_contexts), self._contexts, strict=False)]
        if not group:
            check(self.cursor != (0, 0) or self.window, f"the corpus {self.cfg.corpus!r} has no text for this split")
            self.epoch, self.window, self.cursor, self._contexts = self.epoch + 1, 0, (0, 0), None
            return self._fill()
        self.cursor = group[0].cursor
        step = self.cfg.batch_contexts
        rows = torch.cat(self._run([group[i : i + step] for i in range(0, len(group), step)]))
        g = torch.Generator().manual_seed(derive_seed(self.seed, f"stream/epoch{self.epoch}/window{self.window}"))
        self._rows = rows[torch.randperm(len(rows), generator=g)]

    def _run(self, groups: list[list[Context]]) -> list[Tensor]:
        """The activations of each group of contexts; with `spread`, rank r runs the groups i ≡ r (mod N) and the
        ranks exchange them (every rank, in the same order, however many groups it ran)."""
        if not self.spread:
            return [run_contexts(self.hooked, g)["acts"] for g in groups]
        rank, ranks = self.spread
        mine = {i: run_contexts(self.hooked, g)["acts"] for i, g in enumerate(groups) if i % ranks == rank}
        with distributed.alone(False):
            every = {i: acts for part in distributed.gather_objects(mine) for i, acts in part.items()}
        return [every[i] for i in range(len(groups))]

    def next_batch(self, n: int) -> Tensor:
        parts, need = [], n
        while need:
            if self._rows is None:
                self._fill()
            take = self._rows[self.pos : self.pos + need]
            parts.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos == len(self._rows):
                self.window, self.pos, self._rows = self.window + 1, 0, None
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        """The window in use: its epoch, index and corpus cursor, and the position inside it."""
        if self._rows is None and self.pos == 0:  # between windows: the next one starts where the packer is
            self._fill()
        return {"epoch": self.epoch, "window": self.window, "cursor": list(self.cursor), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.window, self.pos = int(state["epoch"]), int(state["window"]), int(state["pos"])
        self.cursor = (int(state["cursor"][0]), int(state["cursor"][1]))
        self._contexts = None
        self._fill()
        check(self.pos <= len(self._rows), "the stream state does not fit this corpus (was it changed?)")


@register_source("model", StreamConfig)
def open_model_stream(cfg: SourceConfig, split: str) -> ModelStream:
    """Activations of SourceConfig.options' model at its hook over its corpus, computed on the fly."""
    spec = from_dict(StreamConfig, cfg.options, "model source")
    return ModelStream(spec, cfg.seed, split, cfg.heldout)
