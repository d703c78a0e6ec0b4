"""Reconstruction, sparsity and collapse figures shared by training logs, `eval` and the tests."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .code import Code


def total_variance(x: Tensor) -> Tensor:
    """‖x − mean(x)‖² over the batch (never zero, so it can divide).

    In a step whose batch is split over N ranks (`distributed.sharded`): the whole batch's, divided by N and
    without gradient, so each rank's ratio (FVU, and every loss on its scale) averages over the ranks to the
    whole batch's, as the averaged gradients do."""
    n = distributed.shards()
    if n == 1:
        return (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    x = x.detach()
    mean = distributed.total(x.sum(0)) / distributed.rows(x.shape[0])
    return distributed.total((x - mean).pow(2).sum()).clamp_min(1e-12) / n


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained over the batch: ‖x − x̂‖² / ‖x − mean(x)‖²."""
    return (x - x_hat).pow(2).sum() / total_variance(x)


def perplexity(counts: Tensor) -> float:
    """exp of the entropy of the atoms' usage distribution (m when all are used equally)."""
    p = counts.double() / counts.sum().clamp_min(1)
    return math.exp(-(p * p.clamp_min(1e-300).log()).sum().item())


def recovery(atoms: Tensor, true_features: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """Share of true features whose best-matching atom has cosine > threshold, and the mean best cosine."""
    cos = F.normalize(true_features.float(), dim=1) @ F.normalize(atoms.detach().float(), dim=1).t()
    best = cos.max(dim=1).values
    return {"recovered": (best > threshold).float().mean().item(), "mean_best_cos": best.mean().item()}


def flat_metrics(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalars of a nested eval result as `group.key` entries (lists, such as histograms, left out)."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def effective_rank(a: Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli); 0 for an empty matrix."""
    if a.numel() == 0:
        return 0.0
    sv = torch.linalg.svdvals(a.detach().double())
    p = sv / sv.sum().clamp_min(1e-300)
    return math.exp(-(p * p.clamp_min(1e-300).log()).sum().item())


@torch.no_grad()
def atom_cosines(atoms: Tensor, chunk: int = 2048) -> dict[str, float]:
    """Off-diagonal cosine similarity of the atoms: mean |cos|, mean of each atom's max, overall max."""
    a = F.normalize(atoms.detach().float(), dim=1)
    m = a.shape[0]
    if m < 2:
        return {"cos_mean_abs": 0.0, "cos_max_mean": 0.0, "cos_max": 0.0}
    total, best = 0.0, torch.empty(m)
    for s in range(0, m, chunk):
        cos = a[s : s + chunk] @ a.t()
        rows = torch.arange(cos.shape[0])
        cos[rows, rows + s] = 0.0
        total += cos.abs().sum().item()
        best[s : s + chunk] = cos.max(1).values.cpu()
    return {"cos_mean_abs": total / (m * (m - 1)), "cos_max_mean": best.mean().item(), "cos_max": best.max().item()}


def frequency_histogram(counts: Tensor, rows: int, bins: int = 20, low: float = -7.0) -> dict[str, list]:
    """Histogram of log10 firing frequency over atoms that fired at all, plus how many never fired."""
    freq = counts.double() / max(rows, 1)
    fired = freq[freq > 0].log10().clamp_min(low)
    hist = torch.histc(fired, bins=bins, min=low, max=0.0) if fired.numel() else torch.zeros(bins)
    edges = torch.linspace(low, 0.0, bins + 1)
    return {"log10_edges": edges.tolist(), "counts": hist.long().tolist(), "never_fired": int((freq == 0).sum())}


def site_shares(norms: Tensor, live: Tensor | None = None, threshold: float = 0.9) -> dict[str, int]:
    """How the atoms' decoder norms [m, L] (a crosscoder's `site_norms`) split over the sites: an atom with more
    than `threshold` of its summed norm on site l is specific to it (`specific_l`), the others `shared`. Only
    `live` atoms (default: all of non-zero norm) are counted."""
    norms = norms.detach().float().cpu()
    total = norms.sum(1)
    live = total > 0 if live is None else live.cpu() & (total > 0)
    top = (norms / total.clamp_min(1e-12)[:, None]).max(1)
    specific = live & (top.values > threshold)
    out = {f"specific_{site}": int((specific & (top.indices == site)).sum()) for site in range(norms.shape[1])}
    return {**out, "shared": int((live & ~specific).sum())}


class CodeStats:
    """Accumulates FVU, L0 and atom usage over many batches (float64, global mean for the variance).

    With `sites` > 1 (a crosscoder's rows) it also gives the FVU of each site (`site_fvu`). The sums stay on the
    batches' device, so updating never waits for the GPU; `result()` reads them once."""

    def __init__(self, m: int, sites: int = 1):
        self.m, self.sites = m, sites
        self.rows = 0
        self.sums: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, code: Code) -> None:
        x64 = x.detach().double()
        err = (x64 - x_hat.detach().double()).pow(2)
        parts = {"sq_err": err.sum(), "sum_x": x64.sum(0),
                 "sum_sq_x": x64.pow(2).sum(), "l0": code.l0().sum().double(), "counts": code.counts().double()}
        if self.sites > 1:  # per column: each site's sums are its columns'
            parts.update(col_err=err.sum(0), col_sq_x=x64.pow(2).sum(0))
        for key, value in parts.items():
            self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.rows += x.shape[0]

    def merged(self) -> CodeStats:
        """The same figures over every rank's rows (itself in one process): a collective on several ranks."""
        if distributed.world() == 1:
            return self
        out = CodeStats(self.m, self.sites)
        with distributed.sharded():
            out.sums = {k: distributed.total(v.clone()) for k, v in self.sums.items()}
            out.rows = distributed.rows(self.rows)
        return out

    @property
    def counts(self) -> Tensor:
        """[m] float64 firing counts of each atom, on the CPU."""
        return self._read()[4]

    def _read(self) -> tuple[float, Tensor | None, float, float, Tensor]:
        if not self.sums:
            return 0.0, None, 0.0, 0.0, torch.zeros(self.m, dtype=torch.float64)
        s = {k: v.cpu() for k, v in self.sums.items()}
        return s["sq_err"].item(), s["sum_x"], s["sum_sq_x"].item(), s["l0"].item(), s["counts"]

    def site_fvu(self) -> list[float]:
        """The FVU of each site's columns (each over its own variance), from the sums of `update`."""
        s = {k: self.sums[k].cpu().view(self.sites, -1) for k in ("col_err", "col_sq_x", "sum_x")}
        var = s["col_sq_x"].sum(1) - s["sum_x"].pow(2).sum(1) / max(self.rows, 1)
        return (s["col_err"].sum(1) / var.clamp_min(1e-12)).tolist()

    def result(self) -> dict[str, float]:
        n = max(self.rows, 1)
        sq_err, sum_x, sum_sq_x, l0, counts = self._read()
        var = sum_sq_x - (sum_x.pow(2).sum().item() / n if sum_x is not None else 0.0)
        used = counts > 0
        fvu_ = sq_err / max(var, 1e-12)
        return {
            "fvu": fvu_,
            "explained_variance": 1 - fvu_,
            "l0": l0 / n,
            "utilisation": used.double().mean().item(),
            "perplexity": perplexity(counts),
            "dense": (counts / n > 0.1).double().mean().item(),
            "never_fired": (~used).double().mean().item(),
        }
