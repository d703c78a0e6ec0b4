"""Synthetic activations with known ground truth.

`SparseFeatures`: n unit feature directions in d dims (n > d: superposition), each firing independently
with a power-law frequency p_i ∝ (i+1)^-alpha scaled so that `active` fire per row on average, with
coefficients uniform in [coef_min, coef_max] (random sign if `signed`), plus optional Gaussian noise;
`both_polarities` scores how many signed features a coder carries in both directions.
`Clusters`: a mixture of well-separated centres (unit norm) with isotropic noise of norm about `spread`.
`SparseMap`: pairs for transcoders: x = B·f (+ dense Gaussian), target y = A·f (+ C·x), f as SparseFeatures'.
`SiteFeatures`: rows of L sites for crosscoders, x_l = Σ_i c_i f_il over f as SparseFeatures', each feature with
its own direction at every site, except a share `specific` of them planted at one site only (zero elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..code import Code
from ..config import check, derive_seed, from_dict, non_negative
from .source import SourceConfig, register_source


@dataclass
class SparseFeaturesConfig:
    d: int = 64
    n_features: int = 256
    active: float = 6.0  # mean number of features firing per row
    alpha: float = 0.5  # power-law exponent of the firing frequencies
    coef_min: float = 0.5
    coef_max: float = 1.5
    signed: bool = False  # features occur with both signs
    noise: float = 0.0  # std of the Gaussian noise per dimension

    def validate(self) -> None:
        check(self.d > 0 and self.n_features > 0, "d and n_features must be positive")
        check(0 < self.active <= self.n_features, f"active must be in (0, n_features], got {self.active}")
        check(0 <= self.coef_min <= self.coef_max, "need 0 <= coef_min <= coef_max")
        check(self.alpha >= 0 and self.noise >= 0, "alpha and noise must be non-negative")


@dataclass
class ClustersConfig:
    d: int = 64
    n_clusters: int = 256
    spread: float = 0.1  # expected norm of the noise around a centre (centres have norm 1)

    def validate(self) -> None:
        check(self.d > 0 and self.n_clusters > 0, "d and n_clusters must be positive")
        non_negative(self, "spread")


@dataclass
class SparseMapConfig(SparseFeaturesConfig):
    """SparseFeatures' options for x (d wide) and f, plus the target's: y = A·f + C·x, A's columns unit-norm."""

    d_out: int = 48  # width of the target y
    input_noise: float = 0.0  # std per dimension of a dense Gaussian part of x (not from f)
    dense: float = 0.0  # scale of C, a dense linear map of x into y (entries N(0, dense² / d)); 0: none

    def validate(self) -> None:
        super().validate()
        check(self.d_out > 0, f"d_out must be positive, got {self.d_out}")
        non_negative(self, "input_noise", "dense")


class SparseFeatures:
    """Rows x = Σ_i c_i f_i + noise over a sparse set of power-law-frequent features."""

    def __init__(self, cfg: SparseFeaturesConfig, seed: int = 0, stream: str = "train"):
        self.cfg, self.d = cfg, cfg.d
        g = torch.Generator().manual_seed(derive_seed(seed, "truth"))
        self.features = F.normalize(torch.randn(cfg.n_features, cfg.d, generator=g), dim=1)  # [n, d]
        p = (torch.arange(cfg.n_features) + 1.0).pow(-cfg.alpha)
        self.freq = (p * cfg.active / p.sum()).clamp(max=1.0)  # firing probability of each feature
        self.generator = torch.Generator().manual_seed(derive_seed(seed, f"stream{stream}"))

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """([n, d] rows, [n, n_features] true coefficients)."""
        c, g = self.cfg, self.generator
        fires = torch.rand(n, c.n_features, generator=g) < self.freq
        coef = c.coef_min + (c.coef_max - c.coef_min) * torch.rand(n, c.n_features, generator=g)
        if c.signed:
            coef = coef * (torch.randint(0, 2, (n, c.n_features), generator=g) * 2 - 1)
        coef = coef * fires
        x = coef @ self.features
        if c.noise:
            x = x + c.noise * torch.randn(n, x.shape[1], generator=g)
        return x, coef

    def next_batch(self, n: int) -> Tensor:
        return self.sample(n)[0]

    def factored_batch(self, n: int) -> tuple[Tensor, Tensor]:
        """Rows with their ground-truth factors: each feature's true coefficient, 0 where it is silent
        (for InfoMEC in `evaluate`)."""
        return self.sample(n)

    @property
    def truth(self) -> Tensor:
        return self.features

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def both_polarities(atoms: Tensor, code: Code, truth: Tensor, threshold: float = 0.9, share: float = 0.1) -> float:
    """Share of features f whose two poles +f and −f are both carried by some latent: one whose atom has
    cosine > threshold with the pole and that fires with positive values, or cosine < −threshold and
    negative values. A latent "fires with" a sign when at least `share` of its firings in `code` (the
    coder's code of held-out rows) have it: a ReLU SAE needs two latents per feature, a signed code can
    do with one."""
    active = code.active().cpu()
    idx, values = code.indices.cpu()[active], code.values.detach().cpu()[active]
    pos = torch.zeros(code.size).index_add_(0, idx, (values > 0).float())
    neg = torch.zeros(code.size).index_add_(0, idx, (values < 0).float())
    fired = (pos + neg).clamp_min(1)
    up, down = pos / fired >= share, neg / fired >= share
    cos = F.normalize(truth.float(), dim=1) @ F.normalize(atoms.detach().float().cpu(), dim=1).t()  # [n, m]
    plus = ((cos > threshold) & up).any(1) | ((cos < -threshold) & down).any(1)
    minus = ((cos < -threshold) & up).any(1) | ((cos > threshold) & down).any(1)
    return (plus & minus).float().mean().item()


class SparseMap:
    """Rows [x, y] (input then target, d + d_out wide) with y a known sparse linear map of x's features."""

    def __init__(self, cfg: SparseMapConfig, seed: int = 0, stream: str = "train"):
        self.cfg, self.d, self.d_out = cfg, cfg.d, cfg.d_out
        self.inner = SparseFeatures(cfg, seed, stream)  # f and x = B·f (+ noise), its generator the stream's
        g = torch.Generator().manual_seed(derive_seed(seed, "truth/map"))
        self.target_features = F.normalize(torch.randn(cfg.n_features, cfg.d_out, generator=g), dim=1)  # A·e_i
        self.dense_map = torch.randn(cfg.d_out, cfg.d, generator=g) * (cfg.dense / cfg.d**0.5)  # C

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """([n, d] inputs, [n, d_out] targets, [n, n_features] true coefficients)."""
        x, coef = self.inner.sample(n)
        if self.cfg.input_noise:
            x = x + self.cfg.input_noise * torch.randn(n, self.d, generator=self.inner.generator)
        y = coef @ self.target_features
        if self.cfg.dense:
            y = y + x @ self.dense_map.t()
        return x, y, coef

    def next_batch(self, n: int) -> Tensor:
        x, y, _ = self.sample(n)
        return torch.cat([x, y], 1)

    @property
    def truth(self) -> Tensor:
        """The true target directions (columns of A), [n_features, d_out]: what a transcoder's atoms recover."""
        return self.target_features

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


@dataclass
class SiteFeaturesConfig(SparseFeaturesConfig):
    """SparseFeatures' options (d: the width of one site), plus how many sites and how many features are specific."""

    sites: int = 2
    specific: float = 0.25  # share of the features planted at one site only (the sites in turn); the rest at all

    def validate(self) -> None:
        super().validate()
        check(self.sites >= 1, f"sites must be at least 1, got {self.sites}")
        check(0 <= self.specific <= 1, f"specific must be in [0, 1], got {self.specific}")


class SiteFeatures:
    """Rows [x_0, ..., x_{L-1}] (sites side by side, L·d wide) of shared sparse features, some planted at one site."""

    def __init__(self, cfg: SiteFeaturesConfig, seed: int = 0, stream: str = "train"):
        self.cfg, self.d, self.site_widths = cfg, cfg.sites * cfg.d, (cfg.d,) * cfg.sites
        self.inner = SparseFeatures(cfg, seed, stream)  # f and its rows, its atoms replaced by the sites' below
        g = torch.Generator().manual_seed(derive_seed(seed, "truth/sites"))
        n, sites = cfg.n_features, cfg.sites
        dirs = F.normalize(torch.randn(n, sites, cfg.d, generator=g), dim=2)  # each feature's direction per site
        chosen = torch.randperm(n, generator=g)[: round(cfg.specific * n)]
        self.planted = torch.ones(n, sites, dtype=torch.bool)  # [n, L]: where each feature writes
        self.planted[chosen] = F.one_hot(torch.arange(len(chosen)) % sites, sites).bool()
        self.features = self.inner.features = (dirs * self.planted[..., None]).reshape(n, self.d)  # [n, L·d]

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """([n, L·d] rows, [n, n_features] true coefficients)."""
        return self.inner.sample(n)

    def next_batch(self, n: int) -> Tensor:
        return self.sample(n)[0]

    factored_batch = sample

    @property
    def truth(self) -> Tensor:
        """The features' atoms over all sites [n_features, L·d] (zero at the sites a feature is not planted in)."""
        return self.features

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class Clusters:
    """Rows x = centre_c + noise, c uniform over well-separated unit-norm centres."""

    def __init__(self, cfg: ClustersConfig, seed: int = 0, stream: str = "train"):
        self.cfg, self.d = cfg, cfg.d
        g = torch.Generator().manual_seed(derive_seed(seed, "truth"))
        self.centres = F.normalize(torch.randn(cfg.n_clusters, cfg.d, generator=g), dim=1)
        self.generator = torch.Generator().manual_seed(derive_seed(seed, f"stream{stream}"))

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """([n, d] rows, [n] cluster labels)."""
        g = self.generator
        labels = torch.randint(0, self.cfg.n_clusters, (n,), generator=g)
        noise = torch.randn(n, self.cfg.d, generator=g) * (self.cfg.spread / self.cfg.d**0.5)
        return self.centres[labels] + noise, labels

    def next_batch(self, n: int) -> Tensor:
        return self.sample(n)[0]

    def labelled_batch(self, n: int) -> tuple[Tensor, Tensor]:
        """Rows with their cluster as class label (for neural-collapse diagnostics)."""
        return self.sample(n)

    @property
    def truth(self) -> Tensor:
        return self.centres

    state_dict = SparseFeatures.state_dict
    load_state_dict = SparseFeatures.load_state_dict


@register_source("synthetic", SparseFeaturesConfig)
def open_sparse(cfg: SourceConfig, split: str) -> SparseFeatures:
    spec = from_dict(SparseFeaturesConfig, cfg.options, "synthetic source")
    return SparseFeatures(spec, cfg.seed, split)


@register_source("sparse_map", SparseMapConfig)
def open_sparse_map(cfg: SourceConfig, split: str) -> SparseMap:
    spec = from_dict(SparseMapConfig, cfg.options, "sparse_map source")
    return SparseMap(spec, cfg.seed, split)


@register_source("sites", SiteFeaturesConfig)
def open_site_features(cfg: SourceConfig, split: str) -> SiteFeatures:
    spec = from_dict(SiteFeaturesConfig, cfg.options, "sites source")
    return SiteFeatures(spec, cfg.seed, split)


@register_source("clusters", ClustersConfig)
def open_clusters(cfg: SourceConfig, split: str) -> Clusters:
    spec = from_dict(ClustersConfig, cfg.options, "clusters source")
    return Clusters(spec, cfg.seed, split)
