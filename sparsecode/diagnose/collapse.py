"""Neural collapse (Papyan et al.) and posterior collapse figures, for activations or codes.

NC1 = Tr(Σ_W Σ_B⁺)/C, computed in the ≤ C-dimensional span of the centred class means, so features
may be wide (dense SAE codes) without forming a [d, d] matrix. NC2: equinorm (coefficient of variation
of the centred class-mean norms) and equiangularity (mean |cos + 1/(C−1)| over class pairs, 0 on a
simplex ETF). NC3: ‖W/‖W‖ − M/‖M‖‖_F between the classifier and the centred class means. NC4: share of
rows where the classifier and the nearest class mean disagree. Without a given classifier, a ridge
least-squares classifier is fitted on the features themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SparsecodeError


def class_means(h: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """([C, d] class means, [C] counts)."""
    counts = torch.bincount(labels, minlength=n_classes).to(h.dtype)
    sums = torch.zeros(n_classes, h.shape[1], dtype=h.dtype, device=h.device).index_add_(0, labels, h)
    return sums / counts.clamp_min(1)[:, None], counts


def ridge_classifier(h: Tensor, labels: Tensor, n_classes: int, lam: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Least-squares classifier onto one-hot targets: ([C, d] weights, [C] bias)."""
    mu = h.mean(0)
    hc = h - mu
    y = F.one_hot(labels, n_classes).to(h.dtype)
    y_mean = y.mean(0)
    d = h.shape[1]
    if d <= h.shape[0]:
        gram = hc.t() @ hc + lam * h.shape[0] * torch.eye(d, dtype=h.dtype, device=h.device)
        w = torch.linalg.solve(gram, hc.t() @ (y - y_mean)).t()
    else:  # wide features: solve in the row space
        gram = hc @ hc.t() + lam * h.shape[0] * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        w = (hc.t() @ torch.linalg.solve(gram, y - y_mean)).t()
    return w, y_mean - w @ mu


@torch.no_grad()
def neural_collapse(h: Tensor, labels: Tensor, weight: Tensor | None = None,
                    bias: Tensor | None = None) -> dict[str, float]:
    """NC1–NC4 of features `h` [N, d] with integer class `labels` [N] (classes with no row are dropped)."""
    if h.ndim != 2 or labels.shape != (h.shape[0],):
        raise SparsecodeError(f"neural collapse needs features [N, d] and labels [N], got {tuple(h.shape)} "
                              f"and {tuple(labels.shape)}")
    present, labels = torch.unique(labels, return_inverse=True)
    c = present.numel()
    if c < 2:
        raise SparsecodeError("neural collapse needs at least two classes")
    h = h.double()
    if weight is not None:
        weight = weight.double()[present]
        bias = None if bias is None else bias.double()[present]
    means, _ = class_means(h, labels, c)
    centred = means - means.mean(0)  # centred by the mean of class means (balanced global mean)
    # NC1 in the span of the centred means: Σ_B = MᵀM / C, Σ_B⁺ = C·V S⁻² Vᵀ
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    keep = s > s.max() * 1e-8
    v, s = vt[keep].t(), s[keep]
    within = (h - means[labels]) @ v  # [N, r]
    nc1 = (within.pow(2).mean(0) / s.pow(2)).sum().item()  # Tr(Σ_W · C·V S⁻² Vᵀ) / C
    norms = centred.norm(dim=1)
    cos = F.normalize(centred, dim=1) @ F.normalize(centred, dim=1).t()
    off = ~torch.eye(c, dtype=torch.bool, device=h.device)
    if weight is None:
        weight, bias = ridge_classifier(h, labels, c)
    nc3 = (weight / weight.norm() - centred / centred.norm()).norm().item()
    logits = h @ weight.t() + (bias if bias is not None else 0)
    nearest = torch.cdist(h, means).argmin(1)
    return {
        "classes": c,
        "nc1": nc1,
        "nc2_equinorm": (norms.std() / norms.mean()).item(),
        "nc2_equiangular": (cos[off] + 1 / (c - 1)).abs().mean().item(),
        "nc3": nc3,
        "nc4": (logits.argmax(1) != nearest).double().mean().item(),
        "accuracy": (logits.argmax(1) == labels).double().mean().item(),
    }


@torch.no_grad()
def active_units(mu: Tensor, logvar: Tensor | None = None, threshold: float = 0.01) -> dict[str, object]:
    """Posterior collapse: AU = #{i : Cov_x(E[z_i|x]) > threshold}, KL(q(z_i|x) ‖ N(0,1)) per dimension."""
    if mu.ndim != 2:
        raise SparsecodeError(f"active units need posterior means [N, D], got {tuple(mu.shape)}")
    var = mu.double().var(0)
    active = var > threshold
    out: dict[str, object] = {
        "active_units": int(active.sum()),
        "dims": mu.shape[1],
        "active_share": active.double().mean().item(),
        "passive": (~active).nonzero()[:, 0].tolist(),
    }
    if logvar is not None:
        lv = logvar.double()
        kl = 0.5 * (mu.double().pow(2) + lv.exp() - lv - 1).mean(0)
        out["kl_per_dim"] = kl.tolist()
        out["kl"] = kl.sum().item()
    return out
