"""BatchTopK SAE (Bussmann et al. 2024): top k·B activations over the whole batch, a threshold at inference.

Training keeps the k·B largest ReLU pre-activations of the batch (rows get more or fewer than k). The
inference threshold is an EMA (`threshold_decay`) of the smallest value kept in each training batch; eval
and `encode` outside training keep every pre-activation above it, so L0 varies per row around k.

Not sync-free: the k·B picks fall unevenly on rows, and a Code has one width for all rows, so packing them
(`dense_to_code`) reads the busiest row's count from the device in every training step; a fixed width
would be m, a dense code. The threshold's update stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..code import Code
from ..coder import Output, register
from ..config import check
from .base import dense_to_code
from .topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_decay: float = 0.99  # EMA decay of the inference threshold

    def validate(self) -> None:
        super().validate()
        check(0 <= self.threshold_decay < 1, f"threshold_decay must be in [0, 1), got {self.threshold_decay}")


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Top k·B over the batch while training; pre-activation > learned threshold at inference."""

    config_class = BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def batch_select(self, pre: Tensor) -> Code:
        """Keep the k·B largest ReLU pre-activations of the whole batch."""
        flat = pre.relu().flatten()
        keep = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel()), sorted=False).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, keep, True).view_as(pre)
        return dense_to_code(pre.relu() * mask, self.cfg.m)

    def select(self, pre: Tensor) -> Code:
        if self.training or self.threshold < 0:
            return self.batch_select(pre)
        return dense_to_code(pre * (pre > self.threshold), self.cfg.m)

    @torch.no_grad()
    def update_threshold(self, code: Code) -> None:
        """EMA of the smallest kept value, on the device (an empty batch leaves the threshold as it is)."""
        active = code.active()
        low = torch.where(active, code.values.detach(), float("inf")).min()
        d = self.cfg.threshold_decay
        new = torch.where(self.threshold < 0, low, d * self.threshold + (1 - d) * low)
        self.threshold.copy_(torch.where(active.any(), new, self.threshold))

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        pre = self.train_pre_acts(x)
        code = self.batch_select(pre) if self.training else self.select(pre)
        if self.training:
            self.update_threshold(code)
        return self.output(x, pre, self.attach(x, code))
