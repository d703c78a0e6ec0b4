"""InfoMEC (Hsu et al., "Disentanglement via latent quantization"): modularity, explicitness and
compactness of latents with respect to ground-truth factors, from normalised mutual information.

NMI[i, j] = I(factor i; latent j) / H(factor i). InfoM: per active latent, how much of its information is
about one factor; InfoC: per factor, how much of its information sits in one latent (both rescaled so
that 0 = spread evenly, 1 = one-to-one). InfoE: per factor, 1 − CE(multinomial logistic regression from
all latents) / CE(from none). Reading chosen: continuous latents are discretised into `bins` equal-count
bins for the MI (the authors use a k-NN estimator) and standardised for the regression; a latent is
active when it takes more than one value (discrete) or spans > 1/20 of the widest range (continuous), as
the authors do. Pure function of tensors; no training state.

`code_infomec` applies it to a method's codes in `evaluate`, for sources that give rows with their
ground-truth factors (`factored_batch`): the latents are the code's weights of the atoms the rows use
(an atom that never fires is constant and inactive, so leaving it out changes none of the three figures),
and continuous factors (the synthetic sources' true coefficients) are discretised as continuous latents
are: equal-count bins, ties sharing a bin, so that a rarely firing feature becomes on/off. At most
`max_factors` factors are scored, those that differ from their most common value in the most rows; when
the source has more, latents about the unscored ones count as unmodular and lower InfoM. Cost: one LBFGS
regression per scored factor (~0.3–1 s each on a shared CPU core), so `evaluate` scores 8 by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..code import Code


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


def _nmi(fl: list[Tensor], ll: list[Tensor]) -> Tensor:
    """[F, L] I(factor; latent) / H(factor) for label vectors: one joint histogram per factor over all the
    latents at once (a bincount), the same sums as `mutual_information` pair by pair."""
    z = torch.stack(ll, 1)  # [N, L]
    n, n_l, b = z.shape[0], z.shape[1], int(z.max()) + 1
    rows = []
    for f in fl:
        a = int(f.max()) + 1
        key = f[:, None] * b + z + torch.arange(n_l)[None, :] * (a * b)
        joint = torch.bincount(key.flatten(), minlength=n_l * a * b).double().view(n_l, a, b) / n
        outer = joint.sum(2, keepdim=True) * joint.sum(1, keepdim=True)
        mi = torch.where(joint > 0, joint * (joint / outer).log(), 0.0).sum((1, 2))
        rows.append(mi / max(mutual_information(f, f), 1e-12))
    return torch.stack(rows).float()


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
    nmi = _nmi(fl, ll)
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
        # from no latents the class-balanced regression predicts every class alike: CE = log(classes)
        full, null = _cross_entropy(x, f), math.log(int(f.max()) + 1)
        infoe.append((null - full) / max(null, 1e-12))
    return {"infom": float(infom), "infoe": sum(infoe) / len(infoe), "infoc": float(infoc), "nmi": nmi,
            "active": active}


def code_latents(code: Code) -> Tensor:
    """[B, used] float64 weights of the atoms the batch uses: the dense code without its all-zero columns."""
    active = code.active()
    idx = code.indices.clamp_min(0).expand_as(active)[active]
    used, col = torch.unique(idx, return_inverse=True)
    rows = torch.arange(active.shape[0], device=active.device)[:, None].expand_as(active)[active]
    out = torch.zeros(active.shape[0], used.numel(), dtype=torch.float64, device=active.device)
    return out.index_put_((rows, col), code.values[active].double(), accumulate=True).cpu()


def code_infomec(code: Code, factors: Tensor, max_factors: int = 8, bins: int = 20) -> dict[str, float | int]:
    """{'infom', 'infoe', 'infoc', 'factors', 'latents', 'active_latents', 'rows'} of a code of N rows against
    their [N, F] ground-truth factors (continuous values or labels)."""
    factors = factors.detach().cpu()
    if factors.is_floating_point():
        factors = torch.stack([_discretise(factors[:, i], bins) for i in range(factors.shape[1])], 1)
    varies = (factors != factors.mode(0).values).sum(0)  # rows off each factor's most common value
    keep = varies.argsort(descending=True, stable=True)[:max_factors]
    factors = factors[:, keep[varies[keep] > 0]]
    latents = code_latents(code)
    out: dict[str, float | int] = {"rows": int(factors.shape[0]), "factors": int(factors.shape[1]),
                                   "latents": int(latents.shape[1])}
    if factors.shape[1] < 2 or latents.shape[1] == 0:  # InfoM needs two factors; nothing fired: no figures
        return {**out, "infom": 0.0, "infoe": 0.0, "infoc": 0.0, "active_latents": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices, many LBFGS steps: extra threads only add overhead
    try:
        r = infomec(factors, latents, discrete=False, bins=bins)
    finally:
        torch.set_num_threads(threads)
    return {**out, "infom": r["infom"], "infoe": r["infoe"], "infoc": r["infoc"],
            "active_latents": int(r["active"].sum())}
