"""A CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: inside `no_host_sync()`, every operation
that would make the host wait for a GPU raises `HostSync`, even when the tensors live on the CPU.

What counts as waiting: reading a value back (`item`, `bool`, `int`, `float`, `__index__`, `tolist`,
`numpy`, `cpu`), operations whose output size depends on the data (`nonzero`, `torch.where(cond)`,
`argwhere`, `unique`, `bincount`, `masked_select`, `repeat_interleave` by a tensor, indexing or assigning
through a boolean mask), operations that check their input on the host (`multinomial`, `equal`,
`allclose`), and random numbers drawn from the run's host generator (on a GPU, a copy to the device).
Reads of tensors marked as host memory (`sparsecode.coder._host_mirror`, a CPU run's own counters) pass.
Only Python-level calls are seen: a sync inside a C++ kernel (e.g. a sparse product coalescing on CUDA)
is left to the real CUDA test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

TENSOR_READS = ["item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__",
                "__array__", "equal", "allclose", "nonzero", "argwhere", "unique", "unique_consecutive", "bincount",
                "masked_select", "multinomial"]
TORCH_READS = ["nonzero", "argwhere", "unique", "unique_consecutive", "bincount", "masked_select", "multinomial",
               "equal", "allclose", "is_nonzero"]
RANDOM = {torch: ["rand", "randn", "randint", "randperm", "normal", "bernoulli", "poisson"],
          torch.Tensor: ["exponential_", "uniform_", "normal_", "random_", "bernoulli_", "geometric_",
                         "log_normal_", "cauchy_"]}


class HostSync(AssertionError):
    """An operation inside `no_host_sync()` would make the host wait for the device."""


def _is_host_mirror(t: Any) -> bool:
    """A tensor the code marked (`sparsecode.coder._host_mirror`) as host memory it reads on purpose: a CPU
    run's own counters, which only the CPU path reads (on a GPU those stay on the device and are never read
    in a step). Here every tensor is on the host, so only the mark tells it apart."""
    return isinstance(t, torch.Tensor) and getattr(t, "_host_mirror", False) and t.device.type == "cpu"


def _has_bool_mask(index: Any) -> bool:
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@contextmanager
def no_host_sync(host_generator: torch.Generator | None = None) -> Iterator[None]:
    """Make host-syncing operations raise `HostSync` until the block ends (then everything is restored).

    `host_generator`: the run's host (CPU) generator, which a step must not draw from (its draws would be
    copied to the device); pass it where the step has a separate device generator.
    """
    saved: list[tuple[Any, str, bool, Any]] = []

    def patch(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        had = name in vars(owner)
        original = getattr(owner, name)
        saved.append((owner, name, had, vars(owner).get(name)))
        setattr(owner, name, make(original))

    def refuse(what: str) -> Callable[[Callable], Callable]:
        def make(original: Callable) -> Callable:
            def refused(*args: Any, **kwargs: Any) -> Any:
                if args and _is_host_mirror(args[0]):
                    return original(*args, **kwargs)
                raise HostSync(f"{what} waits for the device")
            return refused
        return make

    def checked(what: str, bad: Callable[..., bool]) -> Callable[[Callable], Callable]:
        def make(original: Callable) -> Callable:
            def guarded(*args: Any, **kwargs: Any) -> Any:
                if bad(*args, **kwargs):
                    raise HostSync(f"{what} waits for the device")
                return original(*args, **kwargs)
            return guarded
        return make

    def host_draw(*args: Any, **kwargs: Any) -> bool:
        return host_generator is not None and kwargs.get("generator") is host_generator

    def to_host(self: torch.Tensor, *args: Any, **kwargs: Any) -> bool:  # .to("cpu"): a copy to the host
        target = kwargs.get("device", args[0] if args else None)
        return isinstance(target, str) and target == "cpu"

    def tensor_repeats(self_or_input: Any, repeats: Any = None, *args: Any, **kwargs: Any) -> bool:
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None

    try:
        for name in TENSOR_READS:
            patch(torch.Tensor, name, refuse(f"Tensor.{name}"))
        for name in TORCH_READS:
            patch(torch, name, refuse(f"torch.{name}"))
        patch(torch, "where", checked("torch.where(condition) (a nonzero)", lambda *a, **k: len(a) + len(k) == 1))
        patch(torch.Tensor, "__getitem__", checked("indexing with a boolean mask", lambda s, i: _has_bool_mask(i)))
        patch(torch.Tensor, "__setitem__",
              checked("assigning through a boolean mask", lambda s, i, v: _has_bool_mask(i)))
        for name in ("index_put_", "index_put"):
            patch(torch.Tensor, name, checked(f"Tensor.{name} with a boolean mask",
                                              lambda s, indices, *a, **k: _has_bool_mask(indices)))
        patch(torch.Tensor, "repeat_interleave", checked("repeat_interleave by a tensor", tensor_repeats))
        patch(torch, "repeat_interleave", checked("repeat_interleave by a tensor", tensor_repeats))
        patch(torch.Tensor, "to", checked("Tensor.to('cpu') (a copy to the host)", to_host))
        for owner, names in RANDOM.items():
            for name in names:
                patch(owner, name, checked(f"{name} from the host generator (copied to the device)", host_draw))
        yield
    finally:
        for owner, name, had, original in reversed(saved):
            if had:
                setattr(owner, name, original)
            else:
                delattr(owner, name)
