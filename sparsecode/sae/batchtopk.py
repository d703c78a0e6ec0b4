"""BatchTopK SAE (Bussmann et al. 2024): top k·B activations over the whole batch, a threshold at inference.

Training keeps the k·B largest ReLU pre-activations of the batch (rows get more or fewer than k;
`select.batchtopk`). Eval and `encode` outside training keep every pre-activation above one threshold (the
buffer `threshold`; `select.threshold`), so L0 varies per row around k. While training it follows an EMA
(`threshold_decay`, buffer `threshold_ema`) of the smallest value kept in each batch, as the paper describes;
averaged over past batches and weights, it misses L0 = k by several percent either way. So after the last
step the trainer calibrates it on `calibration_rows` fresh training rows: the value above which k·N of their
N rows' ReLU pre-activations lie (`TopKSAE.calibrate`), so rows of the training distribution average L0 = k.
The EMA is kept, so training resumed past the end goes on as a straight run would. A registered config of
the TopK SAE.

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
    threshold_decay: float = 0.99  # EMA decay of the inference threshold while training
    calibration_rows: int = 16384  # training rows the threshold is calibrated on after the last step; 0: keep the EMA
    selection = "batchtopk"  # a class constant, not an option


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """Top k·B over the batch while training; pre-activation > learned threshold at inference."""

    config_class = BatchTopKConfig
