"""The collapse doctor: what collapsed in a run, the likely cause from explicit checks, and the change to make.

Each finding names its symptom, the check that explains it, the figure that triggered it and the fix. The
checks read the run's config, its metrics log, the trained method and a sample of held-out rows; none trains.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..coder import Coder

UNUSED = 0.01  # share of atoms that never fire on the sample above which they are reported
DOMINANT = 0.5  # share of the variance in one dimension above which the data counts as dominated by it
NORM_RATIO = 2.0  # codes whose median norm is this far (either way) from the rows' count as mis-scaled
CHURN = 1e-3  # restarts per step, as a share of the codebook, above which restarts have not settled
L0_TOLERANCE = 0.1  # an inference threshold whose held-out L0 is further than this share from k is off target


@dataclass
class Finding:
    """One diagnosis: the symptom, its likely cause, the figure behind it, and the change to make."""

    what: str
    cause: str
    figure: str
    fix: str

    def lines(self) -> str:
        return f"{self.what}\n  cause: {self.cause} ({self.figure})\n  fix: {self.fix}"


def _unused(coder: Coder, x: Tensor) -> tuple[float, int]:
    """(share of atoms no row of x uses, how many rows)."""
    with torch.no_grad():
        counts = coder.eval().encode(x).counts()
    return float((counts == 0).float().mean()), x.shape[0]


def _tokens_trained(log: list[dict[str, Any]]) -> int:
    return int(log[-1]["tokens"]) if log else 0


def unused_atoms(cfg: Any, log: list[dict[str, Any]], coder: Coder, x: Tensor) -> list[Finding]:
    """Atoms that never fire on held-out rows, and the checks that explain them."""
    share, rows = _unused(coder, x)
    if share <= UNUSED:
        return []
    what = f"unused atoms: {share:.1%} of the {coder.cfg.m} never fire on {rows} held-out rows"
    out = []
    tokens = _tokens_trained(log)
    c = coder.cfg
    if hasattr(c, "aux_k") and c.dead_tokens >= tokens:
        out.append(Finding(what, "the dead window is longer than the run, so AuxK never acted",
                           f"dead_tokens={c.dead_tokens} ≥ {tokens} tokens trained",
                           f"--set dead_tokens={max(1, tokens // 20)} (a twentieth of the run), then retrain"))
    if getattr(c, "restart_after", 0) > 0 and c.restart_after * c.m >= tokens:
        out.append(Finding(what, "codes restart only after restart_after·m unused rows, more than the run saw",
                           f"restart_after·m = {c.restart_after * c.m:.0f} ≥ {tokens} tokens trained",
                           f"--set restart_after={max(tokens / (4 * c.m), 0.01):.3g} or train longer"))
    var = x.var(0)
    top = float(var.max() / var.sum().clamp_min(1e-12))
    if top > DOMINANT:
        out.append(Finding(what, "one dimension holds most of the variance, so distances see little else",
                           f"dimension {int(var.argmax())} holds {top:.0%} of the variance",
                           "standardise the activations per dimension (or metric=cosine for codebooks)"))
    atoms = coder.atoms().detach()
    if not hasattr(c, "aux_k") and atoms.shape[1] == x.shape[1]:  # codebooks: codes live in data space
        ratio = float(atoms.norm(dim=1).median() / x.norm(dim=1).median().clamp_min(1e-12))
        if not 1 / NORM_RATIO <= ratio <= NORM_RATIO:
            out.append(Finding(what, "the codes sit at another scale than the data, so a few near ones take every row",
                               f"median code norm / median row norm = {ratio:.3g}",
                               "start the codes from the data (init=kmeans or init=data)"))
    return out or [Finding(what, "no explicit check explains it", f"{share:.1%} unused",
                           "train longer, or use a smaller dictionary")]


def churning_restarts(cfg: Any, log: list[dict[str, Any]], coder: Coder, x: Tensor) -> list[Finding]:
    """Code restarts that go on in the second half of the run instead of dying out."""
    late = [r["restarts"] for r in log[len(log) // 2:] if "restarts" in r]
    if not late:
        return []
    per_step = sum(late) / len(late)
    if per_step <= CHURN * coder.cfg.m:
        return []
    r = coder.cfg.restart_after
    return [Finding("restarts that never settle", "codes keep being moved after half the run",
                    f"{per_step:.3g} restarts per step in the second half, over {CHURN:.1%} of the {coder.cfg.m} codes",
                    f"--set restart_after={r * 4:.3g} (now {r:.3g}): wait longer before moving a code")]


def loss_curve(cfg: Any, log: list[dict[str, Any]], coder: Coder, x: Tensor) -> list[Finding]:
    """The learning rate judged from the logged training FVU (the reconstruction alone, without auxiliary
    terms that grow as they start to act): rising late (too high) or never falling (too low)."""
    losses = [r["fvu"] for r in log if "fvu" in r]
    if len(losses) < 4:
        return []
    q = max(1, len(losses) // 4)
    first, last, best = losses[0], sum(losses[-q:]) / q, min(losses)
    if last > 1.0:  # worse than predicting every row by the mean: the steps overshoot
        return [Finding("a reconstruction worse than the data mean", "the learning rate is too high",
                        f"training FVU {last:.4g} over the last quarter (1 = the mean's)", f"--lr {cfg.lr / 10:.3g}")]
    if last > 1.1 * best and last > best + 1e-6:
        return [Finding("a loss that rose again", "the learning rate is too high for the late steps",
                        f"training FVU {best:.4g} at best, {last:.4g} over the last quarter", f"--lr {cfg.lr / 3:.3g}")]
    if last > 0.95 * first:
        return [Finding("a loss that never fell", "the learning rate is too low (or nothing trains)",
                        f"training FVU {first:.4g} at the first log, {last:.4g} over the last quarter",
                        f"--lr {cfg.lr * 10:.3g}")]
    return []


def threshold_off_target(cfg: Any, log: list[dict[str, Any]], coder: Coder, x: Tensor) -> list[Finding]:
    """An inference threshold (batchtopk, matryoshka) whose held-out L0 is off the k the run trained at."""
    theta, k = getattr(coder, "threshold", None), getattr(coder.cfg, "k", None)
    if not isinstance(theta, Tensor) or theta.numel() != 1 or k is None or float(theta) < 0:
        return []
    with torch.no_grad():
        l0 = float(coder.eval().encode(x).l0().float().mean())
    if abs(l0 - k) <= L0_TOLERANCE * k:
        return []
    return [Finding("an inference L0 off its target", "the inference threshold does not give the k it trained at",
                    f"held-out L0 {l0:.1f} for k = {k} (threshold {float(theta):.4g})",
                    "train longer or raise threshold_decay, so the threshold settles where L0 = k")]


CHECKS = (unused_atoms, churning_restarts, loss_curve, threshold_off_target)


def diagnose(cfg: Any, log: list[dict[str, Any]], coder: Coder, x: Tensor) -> list[Finding]:
    """Every finding of every check on a run: its TrainConfig, metrics log, trained method and held-out rows."""
    x = x.to(next(iter(coder.buffers())).device, torch.float32)
    return [f for check in CHECKS for f in check(cfg, log, coder, x)]


def as_dicts(findings: list[Finding]) -> list[dict[str, str]]:
    return [asdict(f) for f in findings]
