"""The collapse doctor: what collapsed in a run, the likely cause from explicit checks, and the change to make.

Each symptom here names the causes whose checks (causes.py) fire on the run, each with the figure that
triggered it and the fix. The checks read the run's config, its metrics log, the trained method and a sample
of held-out rows; none trains.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..coder import Coder
from ..metrics import effective_rank
from ..vq.base import restart_age
from . import causes as c
from .causes import Cause, Evidence, Finding

DIAGNOSIS = "diagnosis.json"  # where a run keeps its diagnosis, beside eval.json
UNUSED = 0.01  # share of atoms that never fire on the sample above which they are reported
DENSE_SHARE = 0.1  # share of the atoms that are dense (active on > causes.DENSE of the rows) above which it is reported
PASSIVE = 0.99  # a code dimension that takes one value on this share of rows carries no information
RANK_SHARE = 0.25  # used atoms whose effective rank is below this share of min(m, d, the rows') have collapsed
TWIN_COS = 0.99  # directions this close are duplicates
TWIN_DIST = 0.01  # codebook codes closer than this share of the rows' rms spread are duplicates
TWIN_SHARE = 0.1  # share of the atoms with a duplicate above which duplicates are reported
MAX_TWIN_ATOMS = 4096  # duplicates are looked for among at most this many atoms (a fixed random subset)
CHURN = 1e-3  # restarts per step, as a share of the codebook, above which restarts have not settled
L0_TOLERANCE = 0.1  # an inference threshold whose held-out L0 is further than this share from k is off target
HEALTHY = ("no collapse found: every atom fires on held-out rows and none is dense, no code dimension is passive, "
           "the atoms span the data's directions, restarts settled and the loss fell")

__all__ = ["DIAGNOSIS", "HEALTHY", "Finding", "as_dicts", "describe", "diagnose", "record"]


def attach(what: str, found: list[Cause | None], fallback: Cause) -> list[Finding]:
    """The findings of one symptom: each cause whose check fired, or the fallback when none did."""
    return [f.of(what) for f in found if f is not None] or [fallback.of(what)]


def unused_atoms(ev: Evidence) -> list[Finding]:
    """Atoms that never fire on held-out rows, and the checks that explain them."""
    if ev.levels is not None:  # a per-dimension code's silent dimension is a passive variable
        return []
    share, o, tokens = float((ev.counts == 0).float().mean()), ev.opts, ev.tokens
    if share <= UNUSED:
        return []
    what = f"unused atoms: {share:.1%} of the {o.m} never fire on {ev.x.shape[0]} held-out rows"
    found: list[Cause | None] = []
    if hasattr(o, "aux_k") and o.dead_tokens is not None and o.dead_tokens >= tokens:
        found.append(Cause("the dead window is longer than the run, so AuxK never acted",
                           f"dead_tokens={o.dead_tokens} ≥ {tokens} tokens trained",
                           f"--set dead_tokens={max(1, tokens // 20)} (a twentieth of the run), then retrain"))
    if getattr(o, "restart_after", 0) > 0 and restart_age(o) >= tokens:
        found.append(Cause("codes restart only after more unused rows than the run saw",
                           f"min(restart_after·m, dead_tokens) = {restart_age(o):.0f} ≥ {tokens} tokens trained",
                           f"--set dead_tokens={max(tokens // 4, 1)} (a quarter of the run), then retrain"))
    found += [c.dominant_dimension(ev), c.code_scale(ev), c.distinct_points(ev), c.learning_rate(ev)]
    used = int((ev.counts > 0).sum())
    return attach(what, found, Cause("no explicit check explains it", f"{share:.1%} unused",
                                     f"{c.train_on(ev)}, or -m {max(used, 1)} for a new run"))


def dense_atoms(ev: Evidence) -> list[Finding]:
    """Atoms active on more than causes.DENSE of the rows (sparse codes and codebooks, not per-dimension codes)."""
    if ev.levels is not None:  # every dimension of a scalar quantizer is active on most rows by design
        return []
    freq = ev.counts.float() / ev.x.shape[0]
    dense = freq > c.DENSE
    share = float(dense.float().mean())
    if share <= DENSE_SHARE:
        return []
    what = (f"dense atoms: {share:.1%} of the {ev.opts.m} fire on more than {c.DENSE:.0%} of {ev.x.shape[0]} "
            f"held-out rows (the most on {float(freq.max()):.0%})")
    found = [c.code_size(ev), c.frequency_targets(ev), c.decoder_bias(ev), c.encoder_bias(ev, dense),
             c.distinct_points(ev), c.learning_rate(ev)]
    return attach(what, found, Cause("no explicit check explains it: they may be frequent features of the data",
                                     f"{int(dense.sum())} atoms above {c.DENSE:.0%}", c.train_on(ev)))


def passive_variables(ev: Evidence) -> list[Finding]:
    """Code dimensions that take one value on almost every row: they carry no information."""
    v = ev.levels
    if v is None:
        return []
    top = torch.stack([torch.unique(col, return_counts=True)[1].max() for col in v.t()]).float() / v.shape[0]
    dims = (top >= PASSIVE).nonzero()[:, 0]
    if dims.numel() == 0:
        return []
    listed = ", ".join(map(str, dims[:8].tolist())) + (", ..." if dims.numel() > 8 else "")
    what = (f"passive variables: {dims.numel()} of the {v.shape[1]} code dimensions take one value on "
            f"≥ {PASSIVE:.0%} of {v.shape[0]} held-out rows (dimensions {listed})")
    o, keep = ev.opts, [j for j in range(v.shape[1]) if j not in set(dims.tolist())]
    smaller = (f"--set levels={','.join(str(o.levels[j]) for j in keep)}" if hasattr(o, "levels") and keep
               else f"-m {max(1, len(keep))}")
    return attach(what, [c.saturation(ev, dims), c.data_scale(ev), c.learning_rate(ev)],
                  Cause("no explicit check explains it: the code may have more dimensions than the data needs",
                        f"{dims.numel()} passive of {v.shape[1]}", smaller))


def near(a: Tensor, positions: bool, spread: float) -> Tensor:
    """[n, n] bool, diagonal off: pairs of near-duplicate atoms (cosine > TWIN_COS for directions, distance
    below TWIN_DIST of the rows' rms spread for codebook codes)."""
    if positions:
        close = torch.cdist(a, a) < TWIN_DIST * spread
    else:
        u = F.normalize(a, dim=1)
        close = u @ u.t() > TWIN_COS
    return close & ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)


def collapsed_codes(ev: Evidence) -> list[Finding]:
    """Neural collapse of the codes: the used atoms span far fewer directions than they could, or many atoms
    duplicate each other."""
    x, atoms = ev.x, ev.atoms
    if atoms.shape[1] != x.shape[1] or ev.transcoder:  # a transcoder's atoms are not in x's space
        return []
    centred = x - x.mean(0)
    points = atoms - x.mean(0) if ev.positions else atoms  # codebook codes: their spread around the data mean
    used = points[ev.counts > 0]
    bound = min(ev.opts.m, x.shape[1], effective_rank(centred))
    rank = effective_rank(used)
    out = []
    if rank < RANK_SHARE * bound:
        what = (f"codes collapsed onto few directions: the {used.shape[0]} used atoms have effective rank "
                f"{rank:.1f}, against {bound:.1f} = min(m, d, the rows' effective rank)")
        out += attach(what, [c.code_scale(ev), c.dominant_dimension(ev), c.learning_rate(ev)],
                      Cause("no explicit check explains it", f"effective rank {rank:.1f}", c.train_on(ev)))
    if points.shape[0] > MAX_TWIN_ATOMS:
        pick = torch.randperm(points.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_TWIN_ATOMS]
        points = points[pick.to(points.device)]
    close = near(points, ev.positions, float(centred.pow(2).sum(1).mean().sqrt()))
    share, n = float(close.any(1).float().mean()), points.shape[0]
    if share > TWIN_SHARE:
        how = f"closer than {TWIN_DIST:.0%} of the rows' spread" if ev.positions else f"cos > {TWIN_COS}"
        what = f"duplicated atoms: {share:.0%} of the {n} atoms have a twin ({how})"
        distinct = n - int(close.tril(-1).any(1).sum())  # atoms without a twin of lower index
        out += attach(what, [c.distinct_points(ev), c.learning_rate(ev)],
                      Cause("the dictionary holds more atoms than distinct directions it found",
                            f"{distinct} distinct atoms of {n}", f"-m {distinct}"))
    return out


def churning_restarts(ev: Evidence) -> list[Finding]:
    """Code restarts that go on in the second half of the run instead of dying out."""
    late = [r["restarts"] for r in ev.log[len(ev.log) // 2:] if "restarts" in r]
    if not late:
        return []
    per_step = sum(late) / len(late)
    if per_step <= CHURN * ev.opts.m:
        return []
    o = ev.opts
    wait = f"--set restart_after={o.restart_after * 4:.3g} (now {o.restart_after:.3g})"
    window = restart_age(o)
    if window < o.restart_after * o.m:  # the run's dead window is the shorter wait
        wait = f"--set dead_tokens={min(2 * window, max(ev.tokens // 2, 1)):.0f} (now {window:.0f})"
    return [Finding("restarts that never settle", "codes keep being moved after half the run",
                    f"{per_step:.3g} restarts per step in the second half, over {CHURN:.1%} of the {o.m} codes",
                    f"{wait}: wait longer before moving a code")]


def loss_curve(ev: Evidence) -> list[Finding]:
    """The learning rate judged from the logged training FVU (causes.curve)."""
    found = c.curve(ev)
    return [found[1].of(found[0])] if found else []


def threshold_off_target(ev: Evidence) -> list[Finding]:
    """An inference threshold (batchtopk, matryoshka) whose held-out L0 is off the k the run trained at."""
    theta, k = getattr(ev.coder, "threshold", None), getattr(ev.opts, "k", None)
    if not isinstance(theta, Tensor) or theta.numel() != 1 or k is None or float(theta) < 0:
        return []
    l0 = float(ev.code.l0().float().mean())
    if abs(l0 - k) <= L0_TOLERANCE * k:
        return []
    figure = f"held-out L0 {l0:.1f} for k = {k} (threshold {float(theta):.4g})"
    if not getattr(ev.opts, "calibration_rows", 0):
        return [Finding("an inference L0 off its target", "the threshold is the training EMA, never calibrated",
                        figure, "--set calibration_rows=16384 (fit it after the last step), then retrain")]
    return [Finding("an inference L0 off its target", "the threshold was calibrated to L0 = k on training rows, "
                    "so these rows are not of the training distribution (another split, corpus or layer?)", figure,
                    "diagnose it on rows of the training distribution (--data), or train on these")]


def target_l0_missed(ev: Evidence) -> list[Finding]:
    """jumprelu with a target L0 (k) whose held-out L0 is off k by more than L0_TOLERANCE (causes.theta_speed)."""
    k, l0 = getattr(ev.opts, "k", None), float(ev.code.l0().float().mean())
    found = c.theta_speed(ev.opts, l0) if k is not None and abs(l0 - k) > L0_TOLERANCE * k else None
    return [found.of("an L0 off its target")] if found else []


CHECKS = (unused_atoms, dense_atoms, passive_variables, collapsed_codes, churning_restarts, loss_curve,
          threshold_off_target, target_l0_missed)


def diagnose(cfg: Any, log: list[dict[str, Any]], coder: Coder, x: Tensor) -> list[Finding]:
    """Every finding of every check on a run: its TrainConfig, metrics log, trained method and held-out rows."""
    x = x.to(next(iter(coder.buffers())).device, torch.float32)
    ev = Evidence(cfg, log, coder, x)
    return [f for check in CHECKS for f in check(ev)]


def describe(findings: list[Finding]) -> str:
    """The diagnosis as text, each symptom once with its causes, figures and fixes (what `diagnose` prints)."""
    if not findings:
        return HEALTHY
    lines: list[str] = []
    for i, f in enumerate(findings):
        if i == 0 or f.what != findings[i - 1].what:
            lines.append(f.what)
        lines += [f"  cause: {f.cause}", f"  figure: {f.figure}", f"  fix: {f.fix}"]
    return "\n".join(lines)


def as_dicts(findings: list[Finding]) -> list[dict[str, str]]:
    return [asdict(f) for f in findings]


def record(findings: list[Finding], **about: Any) -> dict[str, Any]:
    """What a run keeps as diagnosis.json: `about` (checkpoint, rows, data), the findings and their text."""
    return {**about, "findings": as_dicts(findings), "text": describe(findings)}
