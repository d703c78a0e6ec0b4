"""Residual VQ: `stages` plain VQ quantizers in a row, each coding what the previous ones left.

Stage s quantizes r_s = x − Σ_{t<s} q_t (EMA updates, k-means init on its own residuals, restarts: the
`vq` machinery, one `VQ` per stage). The code holds one atom per stage: index s·K + j, weight 1, so
m = stages × K and the run's usage counts (utilisation, perplexity over m) are per-stage code usage;
`code_ids(code)` gives the stage-local indices [B, stages] for per-stage figures.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, Output, register
from ..config import check
from ..metrics import fvu
from .vq import VQ, VQConfig


@dataclass
class RVQConfig(VQConfig):
    stages: int = 4  # m = stages × codes per stage

    def validate(self) -> None:
        super().validate()
        check(self.stages > 0 and self.m % self.stages == 0,
              f"m={self.m} must be a positive multiple of stages={self.stages}")

    def stage_config(self) -> VQConfig:
        opts = {f.name: getattr(self, f.name) for f in fields(VQConfig)}
        return VQConfig(**{**opts, "m": self.m // self.stages})


@register("rvq")
class RVQ(Coder):
    """Stages of nearest-code quantization on the running residual."""

    config_class = RVQConfig
    dead_window_parts = VQ.dead_window_parts  # each stage is a VQ: its restart window and k-means start
    init_rows_per_atom = VQ.init_rows_per_atom

    def __init__(self, cfg: RVQConfig):
        super().__init__(cfg)
        self.K = cfg.m // cfg.stages
        self.quantizers = nn.ModuleList(VQ(cfg.stage_config()) for _ in range(cfg.stages))

    def _stages(self):
        for q in self.quantizers:
            q.generator, q.device_generator = self.generator, self.device_generator
        return enumerate(self.quantizers)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        r, idx = x.detach(), []
        for s, q in self._stages():
            i = q.encode(r).indices[:, 0]
            r = r - q.codebook[i]
            idx.append(i + s * self.K)
        return Code.ones(torch.stack(idx, 1), self.cfg.m, x.dtype)

    def atoms(self) -> Tensor:
        return torch.cat([q.codebook for q in self.quantizers])

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.atoms())

    def code_ids(self, code: Code) -> Tensor:
        """[B, stages] index of the chosen code within each stage's codebook."""
        return code.indices - torch.arange(self.cfg.stages, device=code.indices.device) * self.K

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        r, idx, restarts, losses = x.detach(), [], 0.0, {}
        for s, q in self._stages():
            out = q(r)  # EMA update and restarts of stage s happen here when training
            restarts += out.stats.get("restarts", 0.0)
            r = r - out.x_hat.detach()  # the stage's code before its update: the value x̂ is made of
            idx.append(out.code.indices[:, 0] + s * self.K)
            if "codebook" in out.losses:
                losses[f"codebook{s}"] = out.losses["codebook"]
        code = Code.ones(torch.stack(idx, 1), self.cfg.m, x.dtype)
        q_sum = x.detach() - r
        losses["commit"] = self.cfg.beta * fvu(x, q_sum.detach())
        if self.training:
            self.track(code)
        return Output(x + (q_sum - x).detach(), code, losses, {"restarts": restarts})

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        r = x
        for _, q in self._stages():
            q.init_from_data(r)
            r = r - q.codebook[q.encode(r).indices[:, 0]]
