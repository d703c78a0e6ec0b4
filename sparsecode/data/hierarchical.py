"""Synthetic activations with a parent/child hierarchy (the setting of the MP-SAE paper).

Each of `n_parents` unit parent directions p has `n_children` children c_j = cos φ · p + sin φ · u_j,
where the u_j are orthonormal and orthogonal to p: given the parent, the children are orthogonal
(conditionally orthogonal), while each child is strongly aligned with its parent (cos φ = `child_cos`).
A parent fires with probability `p_parent`; when it fires, one of its children fires with probability
`p_child` (uniformly chosen). x = Σ a_p p + Σ a_c c + noise, coefficients uniform in [coef_min, coef_max].
`recovery` scores a dictionary on parents, children and the parent + child composites absorption makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import check, derive_seed, from_dict, non_negative
from .source import SourceConfig, register_source


@dataclass
class HierarchicalConfig:
    d: int = 64
    n_parents: int = 32
    n_children: int = 4  # per parent
    child_cos: float = 0.6  # cosine between a child and its parent
    p_parent: float = 0.06  # firing probability of each parent
    p_child: float = 0.9  # probability that a firing parent brings one of its children
    coef_min: float = 0.5
    coef_max: float = 1.5
    noise: float = 0.0

    def validate(self) -> None:
        check(self.d > 0 and self.n_parents > 0 and self.n_children > 0, "d, n_parents, n_children must be positive")
        check(self.n_children + 1 <= self.d, f"need n_children + 1 <= d, got {self.n_children} and d={self.d}")
        check(0 <= self.child_cos < 1, f"child_cos must be in [0, 1), got {self.child_cos}")
        check(0 < self.p_parent <= 1 and 0 <= self.p_child <= 1, "p_parent must be in (0, 1], p_child in [0, 1]")
        check(0 <= self.coef_min <= self.coef_max, "need 0 <= coef_min <= coef_max")
        non_negative(self, "noise")


class Hierarchical:
    """Rows made of sparse parents, each usually joined by one of its conditionally orthogonal children."""

    def __init__(self, cfg: HierarchicalConfig, seed: int = 0, stream: str = "train"):
        self.cfg, self.d = cfg, cfg.d
        g = torch.Generator().manual_seed(derive_seed(seed, "truth"))
        # per parent: an orthonormal frame [parent, u_1..u_c] from the QR of a Gaussian matrix
        q = torch.linalg.qr(torch.randn(cfg.n_parents, cfg.d, cfg.n_children + 1, generator=g)).Q
        frames = q.transpose(1, 2)  # [P, c+1, d]
        self.parents = frames[:, 0]  # [P, d]
        sin = (1 - cfg.child_cos**2) ** 0.5
        children = cfg.child_cos * frames[:, :1] + sin * frames[:, 1:]  # [P, c, d]
        self.children = F.normalize(children.reshape(-1, cfg.d), dim=1)  # [P·c, d], parent-major
        self.parent_of = torch.arange(cfg.n_parents).repeat_interleave(cfg.n_children)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, f"stream{stream}"))

    @property
    def truth(self) -> Tensor:
        """[P + P·c, d]: parents first, then children."""
        return torch.cat([self.parents, self.children])

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """([n, d] rows, [n, P + P·c] true coefficients)."""
        c, g = self.cfg, self.generator
        P = c.n_parents
        parent_on = torch.rand(n, P, generator=g) < c.p_parent
        child_on = parent_on & (torch.rand(n, P, generator=g) < c.p_child)
        which = torch.randint(0, c.n_children, (n, P), generator=g)
        span = c.coef_max - c.coef_min
        a_parent = (c.coef_min + span * torch.rand(n, P, generator=g)) * parent_on
        a_child = (c.coef_min + span * torch.rand(n, P, generator=g)) * child_on
        child_coef = torch.zeros(n, P, c.n_children).scatter_(2, which[..., None], a_child[..., None])
        coef = torch.cat([a_parent, child_coef.reshape(n, -1)], 1)
        x = coef @ self.truth
        if c.noise:
            x = x + c.noise * torch.randn(n, c.d, generator=g)
        return x, coef

    @property
    def composites(self) -> Tensor:
        """[P·c, d]: each child's parent + child sum, normalised (what an absorbing latent learns)."""
        return F.normalize(self.parents[self.parent_of] + self.children, dim=1)

    def recovery(self, atoms: Tensor, threshold: float = 0.9) -> dict[str, float]:
        """Shares of parents, children and parent + child composites that some atom matches at cosine >
        `threshold`. A composite lies at cos √((1 + child_cos)/2) from both its parts (0.894 at 0.6), a hair
        under 0.9, so `children_strict` also asks the child's best atom to be nearer to the child than to
        its composite, and `composites` counts sums whose best atom is nearer to the sum than to either part."""
        a = F.normalize(atoms.detach().float().cpu(), dim=1)
        to_parent = (self.parents @ a.t())[self.parent_of]  # [P·c, m]: each child's parent
        to_child, to_sum = self.children @ a.t(), self.composites @ a.t()
        best = to_child.argmax(1, keepdim=True)
        strict = to_child.gather(1, best) > to_sum.gather(1, best)
        best = to_sum.argmax(1, keepdim=True)
        apart = to_sum.gather(1, best) > torch.maximum(to_parent, to_child).gather(1, best)
        child, parent = to_child.max(1).values > threshold, (self.parents @ a.t()).max(1).values > threshold
        composite = (to_sum.max(1).values > threshold) & apart[:, 0]
        return {"parents": parent.float().mean().item(), "children": child.float().mean().item(),
                "children_strict": (child & strict[:, 0]).float().mean().item(),
                "composites": composite.float().mean().item()}

    def next_batch(self, n: int) -> Tensor:
        return self.sample(n)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


@register_source("hierarchical", HierarchicalConfig)
def open_hierarchical(cfg: SourceConfig, split: str) -> Hierarchical:
    spec = from_dict(HierarchicalConfig, cfg.options, "hierarchical source")
    return Hierarchical(spec, cfg.seed, split)
