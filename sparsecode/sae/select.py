"""Selection rules: pure functions of the [B, m] pre-activations that return the Code an SAE decodes.

Each takes the pre-activations (and what its rule needs: k, a threshold, a target norm) and the dictionary
size m; none holds state or reads a config. Values are gathered from `pre`, so gradients flow to it through
the kept entries. `Rule` is what AuxK needs from a per-row rule: how to pick, and the value that hides a
live latent from the pick (−inf where the pick ranks pre itself, 0 where it ranks |pre|).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .. import distributed
from ..code import Code
from .base import dense_to_code


def topk(pre: Tensor, k: int, m: int) -> Code:
    """TopK (Makhzani & Frey 2013; Gao et al. 2024): the k largest pre-activations of each row, then ReLU
    (a kept negative value becomes an inactive slot)."""
    values, indices = pre.topk(k, dim=1, sorted=False)
    return Code(indices, values.relu(), m)


def abstopk(pre: Tensor, k: int, m: int) -> Code:
    """AbsTopK ("AbsTopK: rethinking SAEs for bidirectional features"): the k pre-activations of largest
    |value| in each row, kept with their sign (hard thresholding, no ReLU)."""
    indices = pre.detach().abs().topk(k, dim=1, sorted=False).indices
    return Code(indices, pre.gather(1, indices), m)


def batchtopk(pre: Tensor, k: int, m: int) -> Code:
    """BatchTopK (Bussmann et al. 2024): the k·B largest ReLU pre-activations of the whole batch of B rows
    (a row may keep more or fewer than k). Packing them reads the busiest row's count (`dense_to_code`)."""
    flat = pre.relu().flatten()
    if distributed.shards() > 1:  # a split batch: the k·B largest of every rank's, above one shared cut
        n = k * distributed.rows(pre.shape[0])
        top = distributed.everyone(flat.detach().topk(min(n, flat.numel()), sorted=False).values)[0]
        cut = top.topk(min(n, top.numel()), sorted=False).values.min()
        return dense_to_code(pre.relu() * (pre >= cut), m)
    keep = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, keep, True).view_as(pre)
    return dense_to_code(pre.relu() * mask, m)


def threshold(pre: Tensor, theta: Tensor | float, m: int) -> Code:
    """Keep every pre-activation above θ (a scalar or one per latent): BatchTopK's inference rule with its
    learned global threshold, and JumpReLU's z = pre · H(pre − θ). Packing reads the busiest row's count."""
    return dense_to_code(pre * (pre > theta), m)


def topafa(pre: Tensor, target: Tensor, k: int, m: int) -> Code:
    """top-AFA (Lee et al. 2025; the authors' code, SewoongLee/top-afa-sae): sort the ReLU activations of each
    row in decreasing order (at most k), and keep the prefix whose running ℓ2 norm is closest to the row's
    `target` norm [B] (argmin of the absolute gap, at least one slot); the other slots are −1."""
    values, indices = pre.relu().topk(k, dim=1, sorted=True)
    norms = values.detach().pow(2).cumsum(1).sqrt()  # norm of the first j+1 kept
    keep = (norms - target[:, None]).abs().argmin(1, keepdim=True) + 1
    drop = torch.arange(k, device=pre.device)[None, :] >= keep
    return Code(indices.masked_fill(drop, -1), values.masked_fill(drop, 0.0), m)


class Rule(NamedTuple):
    """A per-row rule as AuxK uses it: `pick(pre, k, m)`, and `hide`, the value that keeps a latent out."""

    pick: Callable[[Tensor, int, int], Code]
    hide: float


RELU_TOPK = Rule(topk, float("-inf"))  # ranks pre: −inf never wins
ABS_TOPK = Rule(abstopk, 0.0)  # ranks |pre|: |0| never outranks a dead latent

# the per-row rule behind each `selection` (batchtopk's own rule is over the batch; AuxK picks per row)
ROW_RULES: dict[str, Rule] = {"topk": RELU_TOPK, "abstopk": ABS_TOPK, "batchtopk": RELU_TOPK}
