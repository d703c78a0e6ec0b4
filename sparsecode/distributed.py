"""Data-parallel training under torchrun: the process group, and the reductions a split batch needs.

`launched` joins torchrun's group (RANK/WORLD_SIZE/LOCAL_RANK in the environment; gloo on the CPU, nccl on
cuda:LOCAL_RANK) with a timeout on every collective, and leaves it afterwards; in one process it does nothing.
Inside `sharded()` (the trainer's step, when the world has more than one rank) each rank holds B/N rows of the
global batch, and `total`, `smallest`, `everyone` and `rows` turn its batch statistics into the whole batch's;
outside it, and in one process, they return their input. Every rank calls them in the same order.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import SparsecodeError

TIMEOUT_ENV = "SPARSECODE_DIST_TIMEOUT"  # seconds a collective waits for the other ranks (default 300)
_SHARDS: ContextVar[int] = ContextVar("sparsecode_shards", default=1)
_ALONE: ContextVar[bool] = ContextVar("sparsecode_alone", default=False)


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), also before or after the group exists."""
    return int(os.environ.get("RANK", "0"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() and not _ALONE.get() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() and not _ALONE.get() else 1


@contextmanager
def alone(on: bool = True) -> Iterator[None]:
    """While inside (with `on`), this rank acts as one process (rank 0 of 1): a trainer of coders no other rank
    trains; `alone(False)` goes back to the whole group inside it (the collectives the ranks still share)."""
    token = _ALONE.set(on)
    try:
        yield
    finally:
        _ALONE.reset(token)


def timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "300")
    try:
        seconds = float(value)
    except ValueError:
        raise SparsecodeError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise SparsecodeError(f"{TIMEOUT_ENV} must be positive, got {value!r}")
    return seconds


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for a CUDA run of several ranks, else `device`."""
    if world() > 1 and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _stopped(signum, frame) -> None:
    raise SparsecodeError(f"rank {rank()}: stopped by SIGTERM (torchrun stops every rank when one fails; see the "
                          f"others' output)")


_failed_in_group = False  # set by `launched` when this rank leaves its group with an error


def failed_in_group() -> bool:
    """Whether this process left its torchrun group with an error (its exit then must not wait on gloo's threads)."""
    return _failed_in_group


@contextmanager
def launched(device_name: str) -> Iterator[None]:
    """Be one rank of torchrun's group while inside (nothing in one process, or if a group exists already);
    `device_name`: the run's device (auto, cpu, cuda), which picks the backend.

    A collective that fails (a rank died: its sockets closed) or waits past the timeout raises one SparsecodeError
    (`_collective`); so does SIGTERM, torchrun stopping the survivors of a failed rank (the handler stays: the
    process is ending). A rank ending with an error ignores SIGTERM from then on, so its one line is printed whole."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from .device import pick_device

    device, seconds = pick_device(device_name), timeout()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    with _collective():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=seconds))
    signal.signal(signal.SIGTERM, _stopped)
    global _failed_in_group
    failed = False
    try:
        yield
    except BaseException:
        failed = _failed_in_group = True  # ending with its own error: torchrun's SIGTERM must not cut its report
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    finally:
        if not (failed and device.type == "cuda"):  # nccl's teardown may wait for a dead rank: the exit frees it
            dist.destroy_process_group()


@contextmanager
def _collective() -> Iterator[None]:
    """A collective's failure (a peer's socket closed, the timeout passed) as one line naming the other rank."""
    try:
        yield
    except RuntimeError as e:
        cause = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else "")
        cause = cause.split(". ")[0] or type(e).__name__  # gloo's: "[file:line] Read error ...: Connection reset..."
        peer = f"rank {1 - rank()}" if world() == 2 else "another rank"
        raise SparsecodeError(f"rank {rank()}: {peer} failed or stopped responding ({cause}; a collective waits "
                              f"{timeout():g} s, {TIMEOUT_ENV}); see its output") from None


def _device() -> torch.device:
    """Where this rank's collectives run (nccl: its GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean_over_ranks(values: dict[str, Tensor | float]) -> dict[str, Tensor | float]:
    """Each value's mean over the ranks, in one all-reduce (the same dict in one process)."""
    if world() == 1 or not values:
        return values
    flat = torch.stack([torch.as_tensor(v).detach().to(_device(), torch.float64) for v in values.values()])
    with _collective():
        dist.all_reduce(flat)
    return dict(zip(values, (flat / world()).unbind(), strict=True))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order ([obj] in one process)."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    with _collective():
        dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world() > 1:
        with _collective():
            dist.barrier()


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (so every rank starts from the same weights)."""
    if world() > 1:
        for t in [*module.parameters(), *module.buffers()]:
            with _collective():
                dist.broadcast(t.data, 0)


def average_grads(params: list[torch.nn.Parameter]) -> None:
    """Every rank's gradients replaced by their mean over the ranks, in one all-reduce of the flat gradient.

    Every rank runs the same graph (the same losses: what decides them is reduced), so a parameter without a
    gradient has none on every rank and keeps none (Adam then leaves it alone, as in one process)."""
    params = [p for p in params if p.grad is not None]
    if world() == 1 or not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    with _collective():
        dist.all_reduce(flat)
    flat /= world()
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


# --- inside a step whose batch is split over the ranks ---------------------------------------------
@contextmanager
def sharded() -> Iterator[None]:
    """While inside, the batch a method sees is this rank's share of the global batch (a no-op in one process)."""
    token = _SHARDS.set(world())
    try:
        yield
    finally:
        _SHARDS.reset(token)


def shards() -> int:
    """How many ranks the current batch is split over (1 outside a sharded step)."""
    return _SHARDS.get()


def rows(n: int) -> int:
    """Rows of the whole batch when this rank holds `n` of them (equal shares)."""
    return n * shards()


def total(t: Tensor) -> Tensor:
    """The sum of `t` over the ranks (in place), e.g. counts or sums of a batch statistic; `t` in one process."""
    if shards() > 1:
        with _collective():
            dist.all_reduce(t)
    return t


def smallest(t: Tensor) -> Tensor:
    """The minimum of `t` over the ranks (in place); `t` in one process."""
    if shards() > 1:
        with _collective():
            dist.all_reduce(t, dist.ReduceOp.MIN)
    return t


def everyone(*ts: Tensor) -> tuple[Tensor, ...]:
    """Each tensor's rows from every rank, concatenated in rank order: the global batch's rows in order."""
    if shards() == 1:
        return ts
    out = []
    for t in ts:
        parts = [torch.empty_like(t) for _ in range(shards())]
        with _collective():
            dist.all_gather(parts, t.contiguous())
        out.append(torch.cat(parts))
    return tuple(out)
