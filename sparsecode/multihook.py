"""Several hooks from one forward pass: `sparsecode train --source model --hook A --hook B` (or a pattern,
'transformer.h.*') trains one coder per hook, each in its own run folder OUT/<hook> with its own Trainer, config
and checkpoints, all fed from one stream that runs the model once per batch.

Each run's config names a model source of its hook alone, with the run's seed, and its rows are that stream's
(the window shuffle depends on the seed and the rows' count, not on the hook): the coder of hook A equals a
single-hook run on A with the same seed, and each run reopens alone (eval, report, --resume). The trainers take
turns step by step, so a batch is kept only until every one has read it; under torchrun each trains on its share
of every batch as a single run does, the trainers' collectives in the same order on every rank.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack
from itertools import accumulate, zip_longest
from pathlib import Path
from typing import Any

from torch import Tensor

from . import checkpoint as ck
from . import distributed
from .coder import Coder
from .config import check, from_dict
from .data.source import SourceConfig
from .data.stream import ModelStream, StreamConfig
from .device import deterministic_kernels
from .errors import SparsecodeError
from .files import check_folder
from .train import TrainConfig, Trainer


class SharedRows:
    """One stream read by several consumers that ask for the same batches in the same order: each batch is
    computed once, with the stream's state where it starts, and kept until every consumer has read it."""

    def __init__(self, stream: ModelStream, consumers: int):
        self.stream, self.offsets = stream, [0] * consumers
        self.chunks: list[tuple[int, dict[str, Any], Tensor]] = []  # (offset, stream state there, rows)
        self.head = 0  # offset after the last chunk
        self.loaded: dict[str, Any] | None = None

    def _chunk(self, offset: int) -> tuple[int, dict[str, Any], Tensor]:
        found = [c for c in self.chunks if c[0] == offset]
        if not found:
            raise SparsecodeError("the hooks' runs asked for different batches (they must train alike)")
        return found[0]

    def read(self, who: int, n: int) -> Tensor:
        offset = self.offsets[who]
        if offset == self.head:
            self.chunks.append((offset, self.stream.state_dict(), self.stream.next_batch(n)))
            self.head += n
        rows = self._chunk(offset)[2]
        check(len(rows) == n, "the hooks' runs asked for different batches (they must train alike)")
        self.offsets[who] = offset + n
        self.chunks = [c for c in self.chunks if c[0] + len(c[2]) > min(self.offsets)]
        return rows

    def state(self, who: int) -> dict[str, Any]:
        """Consumer `who`'s place in the stream, as a stream of its hook alone would give it."""
        offset = self.offsets[who]
        return self.stream.state_dict() if offset == self.head else copy.deepcopy(self._chunk(offset)[1])

    def load(self, who: int, state: dict[str, Any]) -> None:
        if self.loaded is None:
            self.stream.load_state_dict(state)
            self.loaded, self.chunks, self.head, self.offsets = state, [], 0, [0] * len(self.offsets)
        check(state == self.loaded, "the hooks' runs stopped at different places of the stream; resume each alone "
                                    "(sparsecode train --out OUT/HOOK --resume) to the same step first")


class HookRows:
    """One hook's columns of a SharedRows stream: an activation source for one Trainer."""

    def __init__(self, shared: SharedRows, who: int, lo: int, hi: int):
        self.shared, self.who, self.lo, self.hi, self.d = shared, who, lo, hi, hi - lo

    def next_batch(self, n: int) -> Tensor:
        return self.shared.read(self.who, n)[:, self.lo : self.hi]

    def state_dict(self) -> dict[str, Any]:
        return self.shared.state(self.who)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shared.load(self.who, state)


def train_hooks(cfg: TrainConfig, hooks: list[str], out: Path, resume: bool = False, progress: bool = False,
                reshard: bool = False, by_rank: bool = False) -> dict[str, Coder | None]:
    """Train `cfg` (a model source) once per hook of `hooks` (paths or patterns) into out/<hook>, from one forward
    pass per batch; returns the coders by hook (None: trained by another rank).

    `by_rank` (under torchrun, N ranks): rank r trains hooks r, r+N, … alone (each run as one process's), the ranks
    share each window's forward passes and exchange the activations; otherwise every rank trains every hook on
    its share of each batch."""
    source = cfg.source
    check(source is not None and source.kind == "model", "--hook trains one coder per hook of --source model")
    check("hook" not in source.options, "give the hooks with --hook, not --source-opt hook=...")
    check_folder(Path(out), "run folder")
    with distributed.launched(cfg.device):
        rank, ranks = distributed.rank(), distributed.world()
        by_rank = by_rank and ranks > 1
        spec = from_dict(StreamConfig, source.options, "model source")
        stream = ModelStream(spec, source.seed, "train", source.heldout, hooks=hooks, spread=by_rank)
        runs = {h: Path(out) / h for h in stream.hooks}
        check(not by_rank or len(runs) >= ranks, f"--hooks-by-rank: {len(runs)} hook(s) for {ranks} ranks; give "
                                                 f"each rank one at least")
        saved = {(ck.latest_checkpoint(r) or Path("none")).name if r.is_dir() else "none" for r in runs.values()}
        check(len(saved) == 1, f"the hooks' runs in {out} stopped at different checkpoints ({', '.join(sorted(saved))})"
                               f"; resume each alone (sparsecode train --out OUT/HOOK --resume) to the same step first")
        mine = [i for i in range(len(runs)) if not by_rank or i % ranks == rank]
        coders: dict[str, Coder | None] = dict.fromkeys(runs)
        with distributed.alone(by_rank), ExitStack() as locks, deterministic_kernels(cfg.deterministic):
            shared, trainers, starts = SharedRows(stream, len(mine)), [], [0, *accumulate(stream.widths)]
            for who, i in enumerate(mine):
                hook = list(runs)[i]
                own = copy.deepcopy(cfg)
                own.source = SourceConfig(kind="model", options={**source.options, "hook": hook},
                                          heldout=source.heldout, seed=source.seed)
                rows = HookRows(shared, who, starts[i], starts[i + 1])
                trainers.append(Trainer(own, runs[hook], rows, progress and who == 0 and rank == 0, reshard))
            for t in trainers:
                locks.enter_context(t.lock())
            for t in trainers:
                t.start(resume)
            for _ in zip_longest(*(t.steps() for t in trainers)):  # in turn, step by step, to the end
                pass
            coders.update({t.run.name: t.coder for t in trainers})
        distributed.barrier()  # every run is complete before any rank reports
        return coders
