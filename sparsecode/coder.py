"""The one interface every method implements (encode → Code → decode), and the method registry."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from . import distributed
from .code import Code
from .config import check, from_dict, positive
from .errors import SparsecodeError


@dataclass
class CoderConfig:
    """Options every method shares; each method's config subclasses this.

    One vocabulary across methods: `m` is always the number of atoms a Code indexes (SAE latents, codebook
    codes, the quantized dimensions of fsq/lfq/latentquant, kvbottleneck's keys over all heads); `k`, where a
    method has it, is always the most atoms one row's code holds; `init` says how a codebook starts."""

    d_in: int = 0  # width of the activations; filled in from the data source when 0
    m: int = 1024  # atoms in the dictionary / codes in the codebook
    # an atom that has not fired for this many tokens counts as dead (AuxK's window); None: `auto_dead_tokens`
    dead_tokens: int | None = None
    # a transcoder's target width (0: an autoencoder, whose output is its input); the trainer fills it from a
    # source that gives a target. Only methods with `transcodes` accept it.
    d_out: int = 0
    skip: bool = False  # a transcoder's linear skip path: output = decode(code) + x_in · W_skipᵀ (W_skip starts at 0)
    # a crosscoder's sites: rows are `sites` activations of d_in / sites each, side by side (site-major), coded by
    # one code and decoded by one decoder per site; the trainer fills it from a source of several sites. Only
    # methods with `crosscodes` accept sites > 1.
    sites: int = 1

    def validate(self) -> None:
        positive(self, "d_in")
        check(self.m > 0, f"m (dictionary size) must be positive, got {self.m}")
        check(self.d_out >= 0, f"d_out must be 0 (an autoencoder) or a target width, got {self.d_out}")
        check(not self.skip or self.d_out > 0, "skip needs a target: set d_out (a transcoder)")
        check(self.sites >= 1, f"sites must be at least 1, got {self.sites}")
        check(self.d_in % self.sites == 0, f"d_in={self.d_in} does not split into sites={self.sites} of one width")
        check(self.sites == 1 or not self.d_out, f"sites={self.sites} (a crosscoder) with d_out={self.d_out} (a "
                                                 f"transcoder) is not supported; drop one")
        check(self.dead_tokens is None or self.dead_tokens > 0,
              f"dead_tokens must be positive (or none: a twentieth of the run), got {self.dead_tokens}")


DEAD_TOKENS_CAP = 10_000_000  # Gao et al.'s dead window; the auto window never exceeds it
DEAD_TOKENS_UNTIED = 1_000_000  # the window of a coder trained outside the trainer (no run length to tie it to)


INIT_ROWS = 16384  # rows the trainer hands `init_from_data` when the run leaves init_rows unset...
INIT_BYTES = 2**30  # ...or init_rows_per_atom · m rows where that is more, up to this much memory in fp32


def dead_window(cfg: CoderConfig) -> int:
    """The dead window of a coder's config: its dead_tokens (the trainer resolves None), else DEAD_TOKENS_UNTIED."""
    return cfg.dead_tokens if cfg.dead_tokens is not None else DEAD_TOKENS_UNTIED


def auto_init_rows(per_atom: int, m: int, d: int) -> int:
    """init_rows=None resolved when a run is created: INIT_ROWS, or `per_atom` rows per atom (the method's
    `init_rows_per_atom`) where that is more, at most INIT_BYTES of fp32 rows of width d."""
    return max(INIT_ROWS, min(per_atom * m, INIT_BYTES // (4 * max(d, 1))))


def auto_dead_tokens(run_tokens: int, parts: int = 20) -> int:
    """dead_tokens=None resolved when a run is created: a `parts`-th of its tokens (the method's
    `dead_window_parts`), at most 10M (the paper's window).

    A twentieth lets AuxK act on latents that died in the first 95% of any run, however short, while a latent
    only counts as dead after 0.05·run tokens without firing (a tenth left more latents dead on MiniLM:
    BENCHMARKS.md, SAEs on real activations)."""
    return max(1, min(DEAD_TOKENS_CAP, run_tokens // parts))


@dataclass
class SparseConfig(CoderConfig):
    """Options of every method whose code holds at most `k` atoms per row."""

    k: int = 32  # most atoms in one row's code

    def validate(self) -> None:
        super().validate()
        check(0 < self.k <= self.m, f"k must be in 1..m={self.m}, got k={self.k}")


@dataclass
class Output:
    """What a training forward pass returns: the trainer minimises the sum of `losses`."""

    x_hat: Tensor
    code: Code
    losses: dict[str, Tensor]
    # extra figures to log (e.g. restarts); tensors stay on the device, summed there and read when logged
    stats: dict[str, float | Tensor] = field(default_factory=dict)


class Coder(nn.Module):
    """An encoder that picks a few atoms of a dictionary and a decoder that sums them.

    Hooks the trainer calls, no-ops by default: `init_from_data` once before training,
    `after_backward` between backward and the optimizer step, `after_step` after it, and `calibrate` on
    `calibration_rows()` training rows after the last step.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[CoderConfig]] = CoderConfig
    transcodes: ClassVar[bool] = False  # whether d_out > 0 (decode to a target other than the input) is supported
    crosscodes: ClassVar[bool] = False  # whether sites > 1 (one code of several sites, a decoder per site) is supported
    # whether every batch statistic it keeps is reduced over the ranks (`distributed`), so that N ranks with B/N
    # rows each train it as one process with B rows: torchrun runs of more than one rank need it
    data_parallel: ClassVar[bool] = False
    dead_window_parts: ClassVar[int] = 20  # dead_tokens=None: a run's tokens over this (`auto_dead_tokens`)
    train_defaults: ClassVar[dict[str, Any]] = {}  # its own warmup_steps, decay, grad_norm (else TRAIN_DEFAULTS)
    init_rows_per_atom: ClassVar[int] = 0  # a start fitted to the data (k-means) wants this many init rows per atom

    def __init__(self, cfg: CoderConfig):
        super().__init__()
        cfg.validate()
        if cfg.d_out and not self.transcodes:
            able = ", ".join(n for n, c in sorted(REGISTRY.items()) if c.transcodes)
            raise SparsecodeError(f"method {self.name!r} cannot transcode (d_out={cfg.d_out}): it only reconstructs "
                                  f"its input; transcoders: {able}")
        if cfg.sites > 1 and not self.crosscodes:
            able = ", ".join(n for n, c in sorted(REGISTRY.items()) if c.crosscodes)
            raise SparsecodeError(f"method {self.name!r} cannot crosscode (sites={cfg.sites}); crosscoders: {able} "
                                  f"(sites=1 codes the sites' concatenation as one)")
        self.cfg = cfg
        # tokens since each atom last fired; drives dead-latent counts, AuxK and code restarts
        self.register_buffer("since_fired", torch.zeros(cfg.m, dtype=torch.long))
        self.generator: torch.Generator | None = None  # set by the trainer, for repeatable randomness
        # the trainer's generator on the training device (the same object on the CPU): noise drawn in a step
        # comes from it, so a CUDA step never waits for a copy of host-drawn numbers
        self.device_generator: torch.Generator | None = None
        # on a GPU, the host's upper bound of since_fired.max() (see `idle_count`): `track` raises it by the
        # batch; it is read afresh (None: at the next query) only after a write from outside (weights, a test)
        self._idle_bound: int | None = 0
        self._idle_seen = self._idle_key()
        self.register_load_state_dict_post_hook(lambda module, keys: module._read_idle_bound())

    # --- the seam -------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Code:
        raise NotImplementedError

    def decode(self, code: Code) -> Tensor:
        raise NotImplementedError

    def atoms(self) -> Tensor:
        """[m, d_in] the dictionary in input space (decoder rows, or codebook vectors)."""
        raise NotImplementedError

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """The training pass: by default encode, decode and score FVU (of `target`, a transcoder's, else of x);
        methods with more losses override."""
        return self.reconstruct(x if target is None else target, self.encode(x))

    def reconstruct(self, x: Tensor, code: Code, **losses: Tensor) -> Output:
        """Decode `code`, count atom usage in training, and return FVU plus any extra loss terms."""
        from .metrics import fvu

        x_hat = self.decode(code)
        if self.training:
            self.track(code)
        return Output(x_hat, code, {"fvu": fvu(x, x_hat), **losses})

    def transcode(self, x: Tensor) -> Tensor:
        """The coder's output for input rows x: decode(encode(x)) (a transcoder adds its skip path)."""
        return self.predict(x, self.encode(x))

    def predict(self, x: Tensor, code: Code) -> Tensor:
        """The output for inputs x with their code: decode(code) (a transcoder's SAE adds its skip path)."""
        return self.decode(code)

    @property
    def d_out(self) -> int:
        """Width of the output: the target's (a transcoder) or the input's."""
        return self.cfg.d_out or self.cfg.d_in

    # --- hooks for the trainer ------------------------------------------------------------------
    def init_from_data(self, x: Tensor) -> None:
        """Initialise from a sample of the training data (b_dec from the mean, k-means codes...)."""

    def after_backward(self) -> None:
        """Adjust gradients before the optimizer step."""

    def after_step(self) -> None:
        """Restore constraints after the optimizer step."""

    def calibration_rows(self) -> int:
        """How many training rows `calibrate` wants after the last step (0: no calibration)."""
        return 0

    def calibrate(self, x: Tensor) -> None:
        """Fit inference-only state (never what training reads) to rows of the training distribution."""

    def make_optimizer(self, params: list, lr: float, betas: tuple[float, float],
                       fused: bool | None) -> torch.optim.Optimizer:
        """The optimizer the trainer uses for this method: Adam unless a method needs another. `params`: parameters,
        or parameter groups (dicts) as torch's optimizers take them."""
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused)

    # --- shared helpers -------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_in:
            raise SparsecodeError(
                f"{self.name}: input has shape {tuple(x.shape)}, expected [batch, {self.cfg.d_in}]")

    @torch.no_grad()
    def track(self, code: Code) -> None:
        """Update the tokens-since-fired counter with one batch's code (training only), on the device."""
        fresh = self._idle_key() == self._idle_seen and self._idle_bound is not None
        rows = distributed.rows(code.indices.shape[0])  # a split batch: every rank's rows and fires
        self.since_fired += rows
        self.since_fired.masked_fill_(distributed.total(code.counts()) > 0, 0)
        self._idle_bound = self._idle_bound + rows if fresh else None
        self._idle_seen = self._idle_key()

    @property
    def dead_tokens(self) -> int:
        """The dead window (`dead_window`)."""
        return dead_window(self.cfg)

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.dead_tokens

    # --- since_fired, as far as the host knows it without waiting --------------------------------
    def idle_watch(self) -> float:
        """The idle time (tokens) whose atoms `idle_count` counts: dead_tokens (AuxK); vq: its restart age."""
        return self.dead_tokens

    def idle_count(self) -> tuple[int, int | None]:
        """(the longest idle time or an upper bound of it, the number of atoms idle ≥ `idle_watch()` or None).

        On the CPU the device is the host: both are read exactly and nothing waits. On a GPU the host reads
        neither in a step: the count is unknown (None) and the bound is the longest idle time at the last read
        (start, loading weights) plus the tokens tracked since, so what a step does with it (AuxK, restarts)
        depends on the run's history alone, not on how far the host ran ahead of the GPU.
        """
        if self.reads_idle_directly():
            longest, count = _host_mirror(torch.stack([self.since_fired.max(),
                                                       (self.since_fired >= self.idle_watch()).sum()])).tolist()
            return longest, count
        if self._idle_bound is None or self._idle_key() != self._idle_seen:
            self._read_idle_bound()  # written from outside the trainer's steps (a test): read it once
        return self._idle_bound, None

    def reads_idle_directly(self) -> bool:
        """Whether since_fired lives in host memory (a CPU run), where reading it waits for nothing."""
        return self.since_fired.device.type == "cpu"

    def idle_lowered(self) -> None:
        """Note that the method itself only lowered since_fired (restarts): the host's bound stays valid."""
        self._idle_seen = self._idle_key()

    def _read_idle_bound(self) -> None:
        """Read the longest idle time (after loading weights or an outside write; never in a training step)."""
        self._idle_bound = int(self.since_fired.max())
        self._idle_seen = self._idle_key()

    def _idle_key(self) -> tuple[int, int] | None:
        try:  # in-place writes bump a tensor's version; None (always re-read) for inference tensors
            return self.since_fired.data_ptr(), self.since_fired._version
        except RuntimeError:
            return None

    def _apply(self, fn, recurse: bool = True):
        fresh = self._idle_key() == self._idle_seen  # moving the buffer (.to(device)) changes no value
        out = super()._apply(fn, recurse)
        if fresh:
            self._idle_seen = self._idle_key()
        return out

    def generator_for(self, device: torch.device | str | None) -> torch.Generator | None:
        """The run's generator that draws on `device`: the device generator there, else the host one."""
        g = self.device_generator
        return g if g is not None and device is not None and g.device == torch.device(device) else self.generator

    def rand(self, *shape: int, device: torch.device | None = None) -> Tensor:
        """Uniform [0, 1) noise from the run's generator (or the global one outside a trainer), drawn on
        `device` when the trainer gave a generator there; otherwise on the CPU and copied."""
        g = self.generator_for(device)
        if g is None or g.device == torch.device(device or "cpu"):
            return torch.rand(*shape, generator=g, device=device)
        return torch.rand(*shape, generator=g).to(device)

    def randn(self, *shape: int, device: torch.device | None = None) -> Tensor:
        """Standard normal noise, drawn as `rand` draws."""
        g = self.generator_for(device)
        if g is None or g.device == torch.device(device or "cpu"):
            return torch.randn(*shape, generator=g, device=device)
        return torch.randn(*shape, generator=g).to(device)

    def config_dict(self) -> dict[str, Any]:
        from .config import to_dict

        return to_dict(self.cfg)


def _host_mirror(t: Tensor) -> Tensor:
    """Mark a tensor in host memory whose values the host may read without waiting for any device (a CPU
    run's own counters); tests/sync_guard.py, where every tensor is on the host, lets such reads through."""
    if t.device.type != "cpu":
        raise ValueError("only a tensor in host memory can be read without waiting for the device")
    t._host_mirror = True
    return t


REGISTRY: dict[str, type[Coder]] = {}


def register(name: str):
    """Class decorator: make a Coder selectable as `--method name`."""

    def wrap(cls: type[Coder]) -> type[Coder]:
        if name in REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def get_method(name: str) -> type[Coder]:
    """The registered method `name` (`sparsecode/__init__.py` imports sae/ and vq/, which register theirs)."""
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SparsecodeError(f"unknown method {name!r}{hint}; choose from: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def methods() -> dict[str, type[Coder]]:
    """Every registered method, by name."""
    return dict(sorted(REGISTRY.items()))


def build(method: str, options: dict[str, Any]) -> Coder:
    """Build a method from its name and a dict of its config options."""
    cls = get_method(method)
    cfg = from_dict(cls.config_class, options, f"{method!r}")
    return cls(cfg)
