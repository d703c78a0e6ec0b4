"""BatchTopK SAE (Bussmann et al. 2024): top k·B activations over the whole batch, a threshold at inference.

Training keeps the k·B largest ReLU pre-activations of the batch (rows get more or fewer than k;
`select.batchtopk`). The inference threshold is an EMA (`threshold_decay`) of the smallest value kept in
each training batch (the buffer `threshold`); eval and `encode` outside training keep every pre-activation
above it (`select.threshold`), so L0 varies per row around k. A registered config of the TopK SAE.

Not sync-free: the k·B picks fall unevenly on rows, and a Code has one width for all rows, so packing them
(`dense_to_code`) reads the busiest row's count from the device in every training step; a fixed width
would be m, a dense code. The threshold's update stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..coder import register
from .topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_decay: float = 0.99  # EMA decay of the inference threshold
    selection = "batchtopk"  # a class constant, not an option


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Top k·B over the batch while training; pre-activation > learned threshold at inference."""

    config_class = BatchTopKConfig
