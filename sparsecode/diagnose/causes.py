"""The explicit checks behind the collapse doctor's causes (doctor.py holds the symptoms).

Each check reads the run's config, its metrics log, the trained method or the held-out rows, and returns a
`Cause` (the cause, the figure that shows it, the change to make) or None. Fixes are flags of `sparsecode
train` where one exists; where none does, the fix says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ..code import Code
from ..coder import Coder
from ..errors import SparsecodeError

DOMINANT = 0.5  # share of the variance in one dimension above which the data counts as dominated by it
NORM_RATIO = 2.0  # codes whose median norm is this far (either way) from the rows' count as mis-scaled
SWING = 1.25  # logged FVUs this many times apart on average in the second half, with turns, oscillate
DENSE = 0.1  # an atom active on more than this share of rows is dense
DRIFT = 1.0  # b_dec further than this many rms spreads of the rows from their mean has run away
RUNAWAY = 1.0  # an encoder bias this many times the spread of its input term fires whatever the row
SATURATED = 3.0  # a code dimension whose mean is this many spreads away from 0 sits on one level
SCALE = 20.0  # rows whose rms per dimension is this far (either way) from 1 are off the quantizers' scale
FLOOR = 1e-3  # a training FVU below this has nothing left to fall


@dataclass
class Finding:
    """One diagnosis: the symptom, its likely cause, the figure behind it, and the change to make."""

    what: str
    cause: str
    figure: str
    fix: str

    def lines(self) -> str:
        return f"{self.what}\n  cause: {self.cause}\n  figure: {self.figure}\n  fix: {self.fix}"


@dataclass(frozen=True)
class Cause:
    """A cause found by an explicit check, before it is attached to a symptom."""

    cause: str
    figure: str
    fix: str

    def of(self, what: str) -> Finding:
        return Finding(what, self.cause, self.figure, self.fix)


@dataclass
class Evidence:
    """What the doctor reads: the run's TrainConfig, its metrics log, the trained method and held-out rows."""

    cfg: Any
    log: list[dict[str, Any]]
    coder: Coder
    x: Tensor

    @property
    def opts(self) -> Any:
        """The method's config (m, k and its options)."""
        return self.coder.cfg

    @property
    def transcoder(self) -> bool:
        """Whether the atoms live in a target space other than x's (decoder rows of a transcoder)."""
        return bool(getattr(self.opts, "d_out", 0))

    @property
    def tokens(self) -> int:
        return int(self.log[-1]["tokens"]) if self.log else 0

    @cached_property
    def code(self) -> Code:
        with torch.no_grad():
            return self.coder.eval().encode(self.x)

    @cached_property
    def counts(self) -> Tensor:
        """[m] held-out rows each atom is active in."""
        return self.code.counts()

    @cached_property
    def atoms(self) -> Tensor:
        return self.coder.atoms().detach().float()

    @cached_property
    def levels(self) -> Tensor | None:
        """[B, V] the level each code dimension takes on each row, for per-dimension quantizers (fsq, lfq,
        latentquant: a dimension is a variable); None for codes whose slots are not fixed variables."""
        level_index = getattr(self.coder, "level_index", None)
        if level_index is None:
            return None
        with torch.no_grad():
            return level_index(self.code.values)

    @cached_property
    def positions(self) -> bool:
        """Whether the atoms are points in data space (codebooks: every active weight equal) rather than
        directions scaled per row (sparse dictionaries, scalar quantizers)."""
        v = self.code.values[self.code.active()]
        same_space = self.atoms.shape[1] == self.x.shape[1] and not self.transcoder
        return same_space and v.numel() > 0 and bool((v == v[0]).all())


def accepts(opts: Any, **changes: Any) -> bool:
    """Whether the method's config takes these option values (so `--set` with them would run)."""
    try:
        replace(opts, **changes).validate()
    except (SparsecodeError, TypeError, ValueError):
        return False
    return True


def train_on(ev: Evidence) -> str:
    """The fix that trains the same run twice as long."""
    return f"--resume --steps {2 * ev.cfg.steps} (train on)"


def curve(ev: Evidence) -> tuple[str, Cause] | None:
    """The learning rate judged from the logged training FVU (the reconstruction alone): swinging, worse than
    the mean (too high, or data off the method's scale) or rising late (too high), or never falling from above
    FLOOR (too low); (the curve's symptom, its cause) or None."""
    losses, lr = [r["fvu"] for r in ev.log if "fvu" in r], ev.cfg.lr
    if len(losses) < 4:
        return None
    q = max(1, len(losses) // 4)
    first, last, best = losses[0], sum(losses[-q:]) / q, min(losses)
    late = [max(v, 1e-12) for v in losses[len(losses) // 2:]]
    moves = [b / a for a, b in zip(late, late[1:], strict=False)]
    turns = sum((a > 1) != (b > 1) for a, b in zip(moves, moves[1:], strict=False))
    swing = math.exp(sum(abs(math.log(r)) for r in moves) / max(len(moves), 1))
    if len(moves) >= 3 and swing > SWING and 3 * turns >= len(moves):
        return "a loss that swings up and down", Cause(
            "the learning rate is too high: the steps overshoot",
            f"training FVU moves by a factor {swing:.3g} between logs in the second half, turning {turns} times",
            f"--lr {lr / 3:.3g}")
    if last > 1.0:  # worse than predicting every row by the mean: the steps overshoot, or the scale is off
        return "a reconstruction worse than the data mean", data_scale(ev) or Cause(
            "the learning rate is too high", f"training FVU {last:.4g} over the last quarter; the mean's is 1",
            f"--lr {lr / 10:.3g}")
    if last > 1.1 * best and last > best + 1e-6:
        return "a loss that rose again", Cause(
            "the learning rate is too high for the late steps",
            f"training FVU {best:.4g} at best, {last:.4g} over the last quarter", f"--lr {lr / 3:.3g}")
    if last > 0.95 * first and last > FLOOR:
        return "a loss that never fell", Cause(
            "the learning rate is too low (or nothing trains)",
            f"training FVU {first:.4g} at the first log, {last:.4g} over the last quarter", f"--lr {lr * 10:.3g}")
    return None


def learning_rate(ev: Evidence) -> Cause | None:
    """The loss curve's verdict on the learning rate, as a cause of another symptom."""
    found = curve(ev)
    return found[1] if found and "learning rate" in found[1].cause else None


def dominant_dimension(ev: Evidence) -> Cause | None:
    """One dimension of the rows holding most of their variance."""
    var = ev.x.var(0)
    top = float(var.max() / var.sum().clamp_min(1e-12))
    if top <= DOMINANT:
        return None
    fix = ("--set metric=cosine (or standardise the activations per dimension)" if accepts(ev.opts, metric="cosine")
           else "standardise the activations per dimension before training (train has no option for it yet)")
    return Cause("one dimension holds most of the variance, so distances see little else",
                 f"dimension {int(var.argmax())} holds {top:.0%} of the variance", fix)


def code_scale(ev: Evidence) -> Cause | None:
    """Codebook codes at another scale than the rows (median norms more than NORM_RATIO apart)."""
    if not ev.positions:
        return None
    ratio = float(ev.atoms.norm(dim=1).median() / ev.x.norm(dim=1).median().clamp_min(1e-12))
    if 1 / NORM_RATIO <= ratio <= NORM_RATIO:
        return None
    opts = ev.opts
    starts = [v for v in ("kmeans", "data") if getattr(opts, "init", v) != v and accepts(opts, init=v)]
    fix = f"--set init={starts[0]}" if starts else "start the codes from the data (the method has no option for it)"
    return Cause("the codes sit at another scale than the data, so a few near ones take every row",
                 f"median code norm / median row norm = {ratio:.3g}", fix)


def distinct_points(ev: Evidence) -> Cause | None:
    """Held-out rows that hold fewer distinct points than the codebook has codes."""
    n, m = torch.unique(ev.x, dim=0).shape[0], ev.opts.m
    if not ev.positions or n >= m:
        return None
    return Cause("the data has fewer distinct points than the codebook has codes",
                 f"{ev.x.shape[0]} held-out rows hold {n} distinct points for m = {m} codes", f"-m {n}")


def code_size(ev: Evidence) -> Cause | None:
    """A code dense by arithmetic: rows that use a large share of the m atoms, through k or a weak penalty."""
    opts, code = ev.opts, ev.code
    k, m, l0 = getattr(opts, "k", None), opts.m, float(code.l0().float().mean())
    if l0 / m <= DENSE / 2:
        return None
    if k is not None and l0 > 2 * k and (slow := theta_speed(opts, l0)):  # jumprelu short of its target L0
        return slow
    if k is not None:
        return Cause("k is a large share of m, so every atom fires on many rows by arithmetic",
                     f"k/m = {k}/{m} = {k / m:.0%}", f"-m {20 * k} (or -k {max(1, m // 20)})")
    if hasattr(opts, "theta_lr"):  # jumprelu without a target: its θ stops where no row is near it
        return Cause("the L0 penalty does not set the L0: θ stops moving once no pre-activation is near it",
                     f"held-out L0 {l0:.1f} of m = {m} with l0_coef={opts.l0_coef:.3g} and no target k",
                     f"--set k={max(4, m // 128)} (a target L0)")
    penalty = next((p for p in ("l1_coef", "l0_coef") if hasattr(opts, p)), None)
    if penalty:
        v = getattr(opts, penalty)
        return Cause("the sparsity penalty is too weak for this data",
                     f"held-out L0 {l0:.1f} of m = {m} with {penalty}={v:.3g}", f"--set {penalty}={10 * v:.3g}")
    if hasattr(opts, "freq_max"):  # frequency targets set the L0 (frequency_targets)
        return None
    return Cause("each row uses a large share of the atoms, so every atom fires on many rows by arithmetic",
                 f"held-out L0 {l0:.1f} of m = {m}", f"-m {math.ceil(20 * l0)}")


def theta_speed(opts: Any, l0: float) -> Cause | None:
    """A jumprelu L0 off its target k: θ (moving at theta_lr × lr) too slow to reach it, or overshot and stuck;
    None for other methods and jumprelu without k."""
    k, rate = getattr(opts, "k", None), getattr(opts, "theta_lr", None)
    if k is None or rate is None or l0 == k:
        return None
    figure = f"held-out L0 {l0:.1f} for the target k = {k} (theta_lr {rate:.3g})"
    if l0 > k:
        return Cause("θ has not risen far enough in this run: it moves about theta_lr × lr a step", figure,
                     f"--set theta_lr={1.5 * rate:.3g} (or train longer)")
    return Cause("θ overshot and stopped where no pre-activation is near it to bring it back", figure,
                 f"--set theta_lr={rate / 1.5:.3g}")


def frequency_targets(ev: Evidence) -> Cause | None:
    """Target firing frequencies (gba without k) that are dense themselves."""
    top = getattr(ev.opts, "freq_max", None)
    if top is None or getattr(ev.opts, "k", None) is not None or top <= DENSE:
        return None
    low = getattr(ev.opts, "freq_min", 0.0)
    fix = f"--set freq_max={DENSE / 2:.3g}" + (f" --set freq_min={DENSE / 200:.3g}" if low > DENSE / 2 else "")
    return Cause("the target frequencies ask for dense latents", f"freq_max={top:.3g} > {DENSE:.0%}", fix)


@torch.no_grad()
def decoder_bias(ev: Evidence) -> Cause | None:
    """b_dec moved away from the data mean: every pre-activation carries the shared offset W_enc·(mean − b_dec)."""
    b_dec, x = getattr(ev.coder, "b_dec", None), ev.x
    if not isinstance(b_dec, Tensor) or b_dec.shape != x.shape[1:] or not hasattr(ev.coder, "W_enc") or ev.transcoder:
        return None
    mean = x.mean(0)
    drift = float((mean - b_dec).norm() / (x - mean).pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
    if drift <= DRIFT:
        return None
    fix = "--set train_b_dec=false" if getattr(ev.opts, "train_b_dec", False) else f"--lr {ev.cfg.lr / 10:.3g}"
    return Cause("the decoder bias b_dec ran away from the data mean, so a shared offset makes atoms fire",
                 f"‖b_dec − mean‖ = {drift:.3g}× the rows' rms spread", fix)


@torch.no_grad()
def encoder_bias(ev: Evidence, dense: Tensor) -> Cause | None:
    """Encoder biases of the dense atoms large against the spread of their input term W_enc·x."""
    w, b = getattr(ev.coder, "W_enc", None), getattr(ev.coder, "b_enc", None)
    if not isinstance(w, Tensor) or not isinstance(b, Tensor) or b.shape != (w.shape[0],) or not dense.any():
        return None
    spread = (ev.x @ w[dense].t()).std(0).clamp_min(1e-12)
    ratio = float((b[dense] / spread).median())
    if ratio <= RUNAWAY:
        return None
    return Cause("the encoder biases of the dense atoms ran away: they fire whatever the row",
                 f"their encoder bias is {ratio:.3g}× the spread of W_enc·x (median of {int(dense.sum())} atoms)",
                 f"--lr {ev.cfg.lr / 10:.3g}")


@torch.no_grad()
def saturation(ev: Evidence, dims: Tensor) -> Cause | None:
    """Code dimensions whose projected value sits far from 0 against its spread (scalar quantizers)."""
    project = getattr(ev.coder, "project", None)
    if project is None:
        return None
    z = project(ev.x)[:, dims]
    ratio = float((z.mean(0).abs() / z.std(0).clamp_min(1e-12)).median())
    if ratio <= SATURATED:
        return None
    return Cause("the encoder's offset outweighs its spread, so every row lands on the same level",
                 f"the projected value's |mean| is {ratio:.3g}× its spread (median of the passive dimensions)",
                 f"--lr {ev.cfg.lr / 10:.3g}")


def data_scale(ev: Evidence) -> Cause | None:
    """Rows whose rms per dimension is far from 1, where a quantizer's input projection starts."""
    rms = float((ev.x - ev.x.mean(0)).pow(2).mean().sqrt())
    if 1 / SCALE <= rms <= SCALE:
        return None
    return Cause("the activations sit at a scale the input projection does not reach in the run",
                 f"the rows' rms per dimension is {rms:.3g}; the projection starts at unit gain",
                 f"multiply the activations by {1 / max(rms, 1e-12):.3g} before training (train has no option "
                 f"for it yet)")
