"""What the codebooks with a computed codebook share (simvq, frozen_projector, vqbridge).

The codebook C = f(θ) is a function of trainable parameters; each row picks its nearest code (L2 or
cosine, chunked search), weight 1. The codebook loss ‖sg(x) − q‖² trains θ (so every code moves, not
only the chosen ones), the commitment loss β‖x − sg(q)‖² trains whatever feeds the quantizer, and the
straight-through estimator passes gradients from q to x. Both losses are on the FVU scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, Output
from ..config import check, non_negative
from ..metrics import fvu
from .search import SearchConfig, nearest


def identity_linear(d: int) -> nn.Linear:
    """A d×d linear layer (with bias) that starts as the identity map."""
    lin = nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d))
        lin.bias.zero_()
    return lin


@torch.no_grad()
def covariance_root(xc: Tensor) -> Tensor:
    """[d, d] symmetric square root of the covariance of centred rows xc (eigenvalues clamped at 0)."""
    cov = (xc.double().t() @ xc.double()) / max(xc.shape[0] - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)
    return ((evecs * evals.clamp_min(0).sqrt()) @ evecs.t()).to(xc.dtype)


@dataclass
class QuantizerConfig(SearchConfig):
    """Nearest-code lookup with a commitment loss: these methods' options and `vq`'s."""

    metric: str = "l2"  # l2 | cosine
    beta: float = 0.25  # commitment weight

    def validate(self) -> None:
        super().validate()
        check(self.metric in ("l2", "cosine"), f"metric must be 'l2' or 'cosine', got {self.metric!r}")
        non_negative(self, "beta")


class Quantizer(Coder):
    """Nearest code of a computed codebook `codes()`; the codebook is cached while not training."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        self._cache: Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    def codes(self) -> Tensor:
        """[m, d_in] the codebook as a differentiable function of the parameters."""
        raise NotImplementedError

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def current_codes(self) -> Tensor:
        """The codebook without gradient, computed once per evaluation (cached in eval mode)."""
        if self.training or self._cache is None:
            with torch.no_grad():
                codes = self.codes()
            if self.training:
                return codes
            self._cache = codes
        return self._cache

    def lookup(self, x: Tensor, codes: Tensor) -> Code:
        idx = nearest(x.detach(), codes.detach(), self.cfg.metric, self.cfg.search_budget)
        return Code.ones(idx, self.cfg.m, x.dtype)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return self.lookup(x, self.current_codes())

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.current_codes())

    def atoms(self) -> Tensor:
        return self.current_codes()

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        codes = self.codes()
        code = self.lookup(x, codes)
        q = decode(code, codes)
        losses = {"codebook": fvu(x.detach(), q), "commit": self.cfg.beta * fvu(x, q.detach())}
        if self.training:
            self.track(code)
        return Output(x + (q - x).detach(), code, losses, {"restarts": 0.0})

    def after_step(self) -> None:
        self.clear_cache()
