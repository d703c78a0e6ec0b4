"""Variational SAE ("Analysis of variational sparse autoencoders"): a Gaussian encoder, TopK on a sample.

The encoder gives μ = W_enc (x − b_dec) + b_enc and log σ² = W_var (x − b_dec) + b_var; training draws
z = μ + σ·ε (ε from the run's generator, drawn on the training device), keeps its top k after ReLU and adds
the KL of N(μ, σ²) to N(0, I) over all m latents, kl_coef · mean_b KL_b / (mean squared distance to the
batch mean). `encode` is deterministic: TopK of μ (`select.topk`). AuxK as in TopK (auxk.py), on the
sample. Unlike TopK the encoder's gradient is dense: μ and log σ² of all m latents get one, through the KL
(so it has no `sparse_grad` option).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..code import Code
from ..coder import Output, register
from ..config import non_negative
from ..metrics import total_variance
from . import select
from .auxk import AuxKConfig, AuxKSAE


@dataclass
class VSAEConfig(AuxKConfig):
    legacy: ClassVar[dict] = {"sparse_grad": (None, {False: None})}  # dropped: it could only be false
    kl_coef: float = 1e-3
    logvar_init: float = -4.0  # initial log σ² (b_var); W_var starts at zero

    def validate(self) -> None:
        super().validate()
        non_negative(self, "kl_coef")


@register("vsae")
class VSAE(AuxKSAE):
    """TopK SAE whose training code is a reparameterised sample of a diagonal Gaussian."""

    config_class = VSAEConfig

    def __init__(self, cfg: VSAEConfig):
        super().__init__(cfg)
        self.W_var = nn.Parameter(torch.zeros(cfg.m, cfg.d_in))
        self.b_var = nn.Parameter(torch.full((cfg.m,), cfg.logvar_init))

    def logvar(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_var, x - self.b_dec, self.W_var.t())

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ, log σ²) of q(z | x), [B, m] each: what posterior-collapse diagnostics read."""
        return self.pre_acts(x), self.logvar(x)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return select.topk(self.pre_acts(x), self.cfg.k, self.cfg.m)

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        mu = self.pre_acts(x)
        if not self.training:
            return self.sparse_output(x, mu, select.topk(mu, self.cfg.k, self.cfg.m), select.RELU_TOPK, False)
        logvar = self.logvar(x)
        z = mu + (0.5 * logvar).exp() * self.randn(*mu.shape, device=mu.device)
        out = self.sparse_output(x, z, select.topk(z, self.cfg.k, self.cfg.m), select.RELU_TOPK, False)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
        out.losses["kl"] = self.cfg.kl_coef * kl / total_variance(x)
        return out
