"""The one training loop for every method: Adam with warm-up and decay, clipping, logs, exact resume.

Nothing here is global: all state lives in the `Trainer` (and its checkpoint), so several can run in one
process; under torchrun each rank runs one on its share of every batch (`distributed`).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ck
from . import distributed
from .coder import Coder, auto_dead_tokens, auto_init_rows, build, get_method, methods
from .config import check, derive_seed, positive, to_dict
from .data.source import ActivationSource, SourceConfig, open_source, source_sites
from .device import deterministic_kernels, pick_device
from .errors import SparsecodeError
from .files import failpoint, read_jsonl, sweep_temps, writing
from .metrics import CodeStats
from .run_config import CONFIG, TrainConfig, differing_fields, load_config

__all__ = ["CONFIG", "TrainConfig", "Trainer", "differing_fields", "load_config", "train"]
RUN_FILES = {CONFIG, "metrics.jsonl", "checkpoints", ".lock", "eval.json", "diagnosis.json", "report", "origin.json",
             "features.sqlite"}


class Trainer:
    """Trains one method on one activation source into one run folder."""

    def __init__(self, cfg: TrainConfig, run: Path, source: ActivationSource | None = None,
                 progress: bool = True, reshard: bool = False):
        cfg = copy.deepcopy(cfg).resolved()  # the run's own copy, the method's schedule filled in; the caller's stays
        cfg.validate()
        positive(cfg, "steps")
        # under torchrun: each of `world` ranks trains on its share of every batch; rank 0 writes the run
        self.rank, self.world, self.reshard = distributed.rank(), distributed.world(), reshard
        if self.world > 1:
            check(get_method(cfg.method).data_parallel,
                  f"method {cfg.method!r} cannot train on several ranks yet (its batch statistics are not reduced); "
                  f"data-parallel methods: {', '.join(n for n, c in methods().items() if c.data_parallel)}")
            check(cfg.batch_size % self.world == 0,
                  f"batch_size={cfg.batch_size} must be a multiple of the number of ranks ({self.world})")
        self.cfg, self.run, self.progress = cfg, Path(run), progress and self.rank == 0
        self.device = distributed.local_device(pick_device(cfg.device))
        if source is None and cfg.source is None:
            raise SparsecodeError("no activation source: set TrainConfig.source or pass a source")
        if cfg.source is None:
            cfg.source = SourceConfig(kind="memory")
        self.source = source if source is not None else open_source(cfg.source, "train")
        d = cfg.coder.get("d_in", 0) or self.source.d
        check(d == self.source.d, f"the data has d={self.source.d} but the run expects d_in={d}")
        cfg.coder = {**cfg.coder, "d_in": d}
        # a source with a target (`d_out` > 0) gives [n, d_in + d_out] rows, input then target: a transcoder's run
        d_out, want = int(getattr(self.source, "d_out", 0) or 0), cfg.coder.get("d_out", 0) or 0
        if d_out:
            check(want in (0, d_out), f"the source's target has d_out={d_out} but the run expects d_out={want}")
            cfg.coder["d_out"] = d_out
        elif want:
            raise SparsecodeError(f"d_out={want} (a transcoder) needs a source that gives a target "
                                  f"(a paired store: harvest --target)")
        sites = source_sites(self.source, cfg.coder.get("sites"))
        if sites is not None:
            cfg.coder["sites"] = sites
        # dead_tokens None: resolved here, saved in config.json, and on resume taken from there (`start`)
        self.auto_dead_tokens = cfg.coder.get("dead_tokens") is None
        if self.auto_dead_tokens:
            cfg.coder["dead_tokens"] = auto_dead_tokens(cfg.steps * cfg.batch_size,
                                                        get_method(cfg.method).dead_window_parts)
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed alone
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            self.coder: Coder = build(cfg.method, cfg.coder).to(self.device)
        if cfg.init_rows is None:  # resolved like dead_tokens, and saved in config.json
            cfg.init_rows = auto_init_rows(self.coder.init_rows_per_atom, self.coder.cfg.m, self.coder.cfg.d_in)
        self.generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "train"))
        self.coder.generator = self.generator
        # draws inside a step (noise, restarts) come from a generator on the device, so a CUDA step never waits
        # for host-drawn numbers: on CUDA a second one, checkpointed beside the first; on the CPU the same one
        self.device_generator = self.generator if self.device.type == "cpu" else \
            torch.Generator(self.device).manual_seed(derive_seed(cfg.seed, "train-device"))
        self.coder.device_generator = self.device_generator
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)
        params = [p for p in self.coder.parameters() if p.requires_grad]
        fused = self.device.type == "cuda" or None  # one kernel over all parameters; CPU keeps the default
        self.opt = self.coder.make_optimizer(params, cfg.lr, cfg.betas, fused) if params else None
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cfg.lr_factor) if self.opt else None
        self.step = 0

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.opt.state_dict() if self.opt else None,
            "scheduler": self.sched.state_dict() if self.sched else None,
            "generator": self.generator.get_state(),
            **({"device_generator": self.device_generator.get_state()}
               if self.device_generator is not self.generator else {}),
            "source": self.source.state_dict(),
            "world_size": self.world,  # every rank holds this same state; a resume checks the number of ranks
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.opt:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if self.device_generator is not self.generator and "device_generator" in state:
            self.device_generator.set_state(state["device_generator"])
        self.source.load_state_dict(state["source"])

    def save(self, state: dict[str, Any] | None = None) -> None:
        """Rank 0 writes the checkpoint; every rank waits for it (a rank that failed stops the others here)."""
        state = self.state_dict() if state is None else state
        if self.rank == 0:
            ck.save_checkpoint(self.run, self.step, self.coder, state, self.cfg.keep_checkpoints)
        distributed.barrier()

    def lock(self) -> AbstractContextManager[Any]:
        """The run folder checked (a folder of other files gets no lock file either), then locked for this writer
        (rank 0; the other ranks write nothing); a folder the lock created goes again if no checkpoint was saved."""
        check_run_folder(self.run)
        if self.rank != 0:
            return nullcontext()
        return writing(self.run, "run", keep=lambda: (self.run / "checkpoints" / "LATEST").is_file())

    def start(self, resume: bool = False) -> None:
        """Reopen the run to resume from its last checkpoint, or start it afresh, then initialise from data.

        A folder whose writer died before the first checkpoint holds nothing to resume: it starts afresh.
        """
        run, writer = self.run, self.rank == 0  # every rank reads the run; rank 0 alone writes it
        ckpt = ck.latest_checkpoint(run) if run.is_dir() else None
        distributed.barrier()  # every rank has read the folder before rank 0 changes it
        if ckpt is not None:
            if not resume:
                raise SparsecodeError(f"run {run} already exists; resume it (--resume) or pick a new --out")
            saved = load_config(run)  # older configs gain the defaults
            if self.auto_dead_tokens:  # the window resolved when the run was created, whatever its steps now
                self.cfg.coder["dead_tokens"] = self.coder.cfg.dead_tokens = saved.coder.get("dead_tokens")
            differ = differing_fields(saved, self.cfg, ignore=("steps",))
            if differ:
                raise SparsecodeError(f"run {run} was started with another config ({', '.join(differ)} differ); "
                                      f"cannot resume it")
            self.step, state = ck.load_state(ckpt)  # verifies every file's sha256 first
            ranks = int(state.get("world_size", 1))
            if ranks != self.world and not self.reshard:
                raise SparsecodeError(f"run {run} was trained on {ranks} rank(s), not {self.world}; resume it with "
                                      f"{ranks} (torchrun --nproc-per-node {ranks}), or pass --reshard to go on with "
                                      f"{self.world} (the same run up to rounding)")
            kept = len(state["optimizer"]["param_groups"]) if self.opt else 0
            if self.opt and kept != len(self.opt.param_groups):  # e.g. a jumprelu saved before θ had a group of its own
                raise SparsecodeError(f"this checkpoint's optimizer has {kept} parameter group(s), {self.cfg.method} "
                                      f"now trains {len(self.opt.param_groups)}: it was saved by an older sparsecode; "
                                      f"retrain the run")
            if writer:
                sweep_temps(run / "checkpoints")
                sweep_temps(run)
                if saved.steps != self.cfg.steps:  # extending (or shortening) the run survives a later kill
                    ck.atomic_write_json(run / CONFIG, to_dict(self.cfg))
                self._truncate_log()
            ck.load_weights(self.coder, ckpt)
            self.load_state_dict(state)
            return
        check_run_folder(run)
        if writer:
            run.mkdir(parents=True, exist_ok=True)
            sweep_temps(run)
            shutil.rmtree(run / "checkpoints", ignore_errors=True)  # no LATEST: nothing in it is complete
            (run / "metrics.jsonl").unlink(missing_ok=True)
            ck.atomic_write_json(run / CONFIG, to_dict(self.cfg))
            failpoint("config-written")
        if self.cfg.init_rows:  # every rank reads the same rows and starts alike
            x, y = self._pair(self._batch(self.cfg.init_rows))
            if y is None:
                self.coder.init_from_data(x)
            else:
                self.coder.init_from_data(x, target=y)
        distributed.broadcast_module(self.coder)  # rank 0's start, bit for bit, whatever a device's rounding did

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint we resume from (and a line torn by a kill)."""
        log = self.run / "metrics.jsonl"
        if log.exists():
            keep = [rec for rec in read_jsonl(log) if rec["step"] <= self.step]
            ck.atomic_write(log, "".join(json.dumps(rec) + "\n" for rec in keep).encode())

    def _batch(self, n: int, shard: bool = False) -> torch.Tensor:
        """The next n rows of the source; `shard` (a training step on several ranks): this rank's n / world."""
        if shard and self.world > 1:
            lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
            x = self.source.next_shard(n, self.rank, self.world) if hasattr(self.source, "next_shard") \
                else self.source.next_batch(n)[lo:hi]
            n = hi - lo
        else:
            x = self.source.next_batch(n)
        width = self.coder.cfg.d_in + self.coder.cfg.d_out  # a transcoder's rows: input, then target
        if x.ndim != 2 or x.shape != (n, width):
            raise SparsecodeError(f"the source gave a batch of shape {tuple(x.shape)}, "
                                  f"expected [{n}, {width}]")
        if not torch.isfinite(x).all():
            raise SparsecodeError(f"the batch at step {self.step} contains NaN or inf values")
        return x.to(self.device, torch.float32, non_blocking=True)

    def _pair(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input, target) of a batch: a transcoder's rows split at d_in; an autoencoder's target is None."""
        d = self.coder.cfg.d_in
        return (rows, None) if not self.coder.cfg.d_out else (rows[:, :d], rows[:, d:])

    # --- the loop ------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, target: torch.Tensor | None = None):
        """One step (forward, backward, gradient hooks, clipping, optimizer); it never waits for the GPU
        except where a method's table row says so (README: What each method guarantees). `target`: a
        transcoder's, which its loss scores the output against."""
        with self.autocast, distributed.sharded():  # on several ranks: x is this rank's share of the batch
            out = self.coder(x) if target is None else self.coder(x, target=target)
            loss = sum(out.losses.values())
        if self.opt is not None and loss.requires_grad:
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for group in self.opt.param_groups for p in group["params"]]
            distributed.average_grads(params)
            self.coder.after_backward()
            if self.cfg.grad_norm == "unit":
                unit_gradient(params)
            elif self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.coder.after_step()
        return out, loss

    def fit(self, on_step: Callable[[int], None] | None = None) -> Coder:
        """Train until cfg.steps, logging and checkpointing; `on_step(step)` runs after each step."""
        with deterministic_kernels(self.cfg.deterministic):
            for step in self.steps():
                if on_step is not None:
                    on_step(step)
        return self.coder

    def steps(self) -> Iterator[int]:
        """Train until cfg.steps, yielding after each step its number (so several trainers can take turns)."""
        cfg, coder = self.cfg, self.coder
        coder.train()
        stats, extra, t0, tokens0 = CodeStats(coder.cfg.m), {}, time.perf_counter(), self.step
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, mininterval=0.5)
        with open(self.run / "metrics.jsonl", "a") if self.rank == 0 else nullcontext() as log:
            while self.step < cfg.steps:
                x, y = self._pair(self._batch(cfg.batch_size, shard=True))
                out, loss = self.train_step(x, y)
                self.step += 1
                stats.update(x if y is None else y, out.x_hat, out.code)
                for key, value in {"loss": loss, **{f"loss/{k}": v for k, v in out.losses.items()},
                                   **out.stats}.items():  # summed on the device; read when logged
                    value = value.detach().float() if isinstance(value, torch.Tensor) else value
                    extra[key] = extra.get(key, 0.0) + value
                log_now, save_now = self.step % cfg.log_every == 0, self.step % cfg.ckpt_every == 0
                if log_now or save_now or self.step == cfg.steps:
                    sums = distributed.mean_over_ranks(extra)  # every rank checks (and raises) alike
                    self._check_finite(sums["loss"], since=tokens0 + 1)
                if log_now or self.step == cfg.steps:
                    n = self.step - tokens0
                    rec = self._record(stats.merged(), {k: float(v) / n for k, v in sums.items()},
                                       n * cfg.batch_size / (time.perf_counter() - t0))
                    if log is not None:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead']:.1%}",
                                    tok_s=f"{rec['tokens_per_s']:.3g}")
                    stats, extra, t0, tokens0 = CodeStats(coder.cfg.m), {}, time.perf_counter(), self.step
                if save_now or self.step == cfg.steps:
                    state = self.state_dict()  # before any calibration rows are drawn: a resume reads on from here
                    if self.step == cfg.steps:
                        self.calibrate()
                    self.save(state)
                bar.update(1)
                failpoint(f"step:{self.step}")
                yield self.step
        bar.close()
        coder.eval()

    def calibrate(self) -> None:
        """After the last step: hand the method the training rows its `calibrate` hook asks for (none by default).
        They are read past the run's end, so the checkpoint keeps the position before them."""
        rows = self.coder.calibration_rows()
        if rows:
            self.coder.calibrate(self._pair(self._batch(rows))[0])

    def _check_finite(self, loss_sum: torch.Tensor | float, since: int) -> None:
        """Raise before anything is logged or saved if a loss since step `since` was NaN or infinite."""
        if not math.isfinite(float(loss_sum)):
            where = f"at step {self.step}" if since >= self.step else f"between steps {since} and {self.step}"
            raise SparsecodeError(f"the loss became {float(loss_sum)} {where}; lower the lr")

    def _record(self, stats: CodeStats, means: dict[str, float], tokens_per_s: float) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.step * self.cfg.batch_size,
            "tokens_per_s": tokens_per_s,
            "lr": self.opt.param_groups[0]["lr"] if self.opt else 0.0,
            **stats.result(),
            "dead": self.coder.dead_mask().float().mean().item(),
            **means,
        }


def train(cfg: TrainConfig, run: Path, source: ActivationSource | None = None, resume: bool = False,
          progress: bool = False, on_step: Callable[[int], None] | None = None, reshard: bool = False) -> Coder:
    """Train `cfg` into folder `run` (resuming it if asked) and return the trained method.

    The run folder is locked for this writer; one this call created is removed again if training stops
    before its first checkpoint. Under torchrun every rank trains on its share of each batch (`distributed`)
    and rank 0 alone locks and writes the run; `reshard`: resume a run saved by another number of ranks."""
    with distributed.launched(cfg.device):
        trainer = Trainer(cfg, run, source, progress, reshard)  # the config and the source are checked first
        with trainer.lock():
            trainer.start(resume)
            return trainer.fit(on_step)


def unit_gradient(params: list[torch.Tensor]) -> None:
    """Scale the gradient to global norm 1 (`grad_norm` unit): Adam then weighs every step's direction alike, where
    its second moment (β2 0.999) otherwise remembers the larger gradients of a run's first steps."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_div_(grads, torch.nn.utils.get_total_norm(grads).clamp_min(1e-12))


def check_run_folder(run: Path) -> None:
    """Refuse an existing folder that holds files a run does not write (it is not a run: pick another)."""
    foreign = [p.name for p in run.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp")] \
        if run.is_dir() else []
    if foreign:
        raise SparsecodeError(f"{run} exists and is not a sparsecode run (it holds {', '.join(sorted(foreign)[:3])}"
                              f"); pick a new --out")
