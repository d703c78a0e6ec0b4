"""InfoMEC (Hsu et al., "Disentanglement via latent quantization"): modularity, explicitness and
compactness of latents with respect to ground-truth factors, from normalised mutual information.

NMI[i, j] = I(factor i; latent j) / H(factor i). InfoM: per active latent, how much of its information is
about one factor; InfoC: per factor, how much of its information sits in one latent (both rescaled so
that 0 = spread evenly, 1 = one-to-one). InfoE: per factor, 1 − CE(multinomial logistic regression from
all latents) / CE(from none). Reading chosen: continuous latents are discretised into `bins` equal-count
bins for the MI (the authors use a k-NN estimator) and standardised for the regression; a latent is
active when it takes more than one value (discrete) or spans > 1/20 of the widest range (continuous), as
the authors do. Pure function of tensors; no training state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _labels(col: Tensor) -> Tensor:
    return torch.unique(col, return_inverse=True)[1]


def _discretise(col: Tensor, bins: int) -> Tensor:
    """Equal-count bins of a continuous column (ties share a bin)."""
    col = col.double().contiguous()
    edges = torch.quantile(col, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    return _labels(torch.bucketize(col, edges))


def mutual_information(a: Tensor, b: Tensor) -> float:
    """I(a; b) in nats for two [N] label vectors."""
    a, b = _labels(a), _labels(b)
    joint = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(a.shape[0], dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * (joint[nz] / (pa @ pb)[nz]).log()).sum())


def _cross_entropy(x: Tensor, y: Tensor, iters: int = 100) -> float:
    """Training cross-entropy of a class-balanced multinomial logistic regression of y on x (LBFGS)."""
    classes = int(y.max()) + 1
    weight = (y.shape[0] / (classes * torch.bincount(y, minlength=classes).clamp_min(1))).double()
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y, weight=weight)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(F.cross_entropy(x @ w + b, y))


def infomec(factors: Tensor, latents: Tensor, discrete: bool, bins: int = 20) -> dict[str, object]:
    """{'infom', 'infoe', 'infoc', 'nmi' [factors, latents], 'active' [latents]} for [N, F] discrete
    factors and [N, L] latents (discrete codes, or continuous values when `discrete` is False)."""
    factors, latents = factors.cpu(), latents.detach().cpu().double()
    fl = [_labels(factors[:, i]) for i in range(factors.shape[1])]
    ll = [_labels(latents[:, j]) if discrete else _discretise(latents[:, j], bins) for j in range(latents.shape[1])]
    nmi = torch.tensor([[mutual_information(f, z) / max(mutual_information(f, f), 1e-12) for z in ll] for f in fl])
    ranges = latents.max(0).values - latents.min(0).values
    active = ranges > 0 if discrete else ranges > ranges.max() / 20
    n_f, n_a = factors.shape[1], int(active.sum())
    pruned = nmi[:, active]
    infom = ((pruned.max(0).values / pruned.sum(0).clamp_min(1e-12)).mean() - 1 / n_f) / (1 - 1 / n_f)
    infoc = ((pruned.max(1).values / pruned.sum(1).clamp_min(1e-12)).mean() - 1 / n_a) / (1 - 1 / n_a) \
        if n_a > 1 else torch.tensor(1.0 if n_a == 1 else 0.0)
    if discrete:
        x = torch.cat([F.one_hot(z).double() for z in ll], 1)
    else:
        x = (latents - latents.mean(0)) / latents.std(0).clamp_min(1e-12)
    infoe = []
    for f in fl:
        full, null = _cross_entropy(x, f), _cross_entropy(torch.zeros(x.shape[0], 1, dtype=torch.float64), f)
        infoe.append((null - full) / max(null, 1e-12))
    return {"infom": float(infom), "infoe": sum(infoe) / len(infoe), "infoc": float(infoc), "nmi": nmi,
            "active": active}
