"""TopK SAE (Gao et al. 2024) and the family built on it: one class, its rule chosen by the config.

`selection` picks the code from the pre-activations with a rule of select.py: `topk` (ReLU, the k largest
of each row), `abstopk` (the k largest |pre|, signed) or `batchtopk` (the k·B largest of the batch, and a
threshold at inference: an EMA while training, `threshold_decay`, calibrated after the last step on
`calibration_rows` training rows). `prefixes` adds the nested-prefix loss (nested.py). AuxK revives dead
latents (auxk.py). The registered names are configs of this class with their own defaults: `topk` here,
`abstopk`, `batchtopk` and `matryoshka` in their modules; selection, prefixes, threshold_decay and
calibration_rows are options only where they do something (plain class constants elsewhere).

With `sparse_grad` (the default) the [B, m] pre-activations are scored without autograd and only the
picked ones are made differentiable (kernels/sparse_encoder.py): the encoder's backward costs O(B·k·d)
instead of two dense matmuls. `sparse_grad=false` is the dense reference path; both give the same
gradients (tests/test_kernels.py, tests/test_topk.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import distributed
from ..code import Code
from ..coder import Output, register
from ..config import check, non_negative
from . import select
from .auxk import AuxKConfig, AuxKSAE
from .nested import parse_prefixes, prefix_losses

CALIBRATION_CHUNK = 1 << 24  # pre-activations scored at once while calibrating (64 MB in fp32)


@dataclass
class TopKConfig(AuxKConfig):
    sparse_grad: bool = True  # encoder gradients only for the picked latents (False: dense reference)
    center_input: bool = True  # the encoder reads x − b_dec (False: x itself, as some imported SAEs do)
    # not options of `topk` (no annotation: class constants); registered configs make them options
    selection = "topk"  # topk | abstopk | batchtopk: the rule of select.py that picks the code
    prefixes = "1"  # fractions of m whose prefixes each reconstruct x alone (nested.py); "1": none but m
    threshold_decay = None  # EMA decay of the inference threshold (an option of batchtopk); None: none held
    calibration_rows = 0  # training rows the inference threshold is calibrated on after the last step

    def validate(self) -> None:
        super().validate()
        check(self.selection in select.ROW_RULES,
              f"selection must be one of {', '.join(select.ROW_RULES)}, got {self.selection!r}")
        check(self.selection != "batchtopk" or self.threshold_decay is not None,
              "selection=batchtopk needs an inference threshold (threshold_decay)")
        check(self.threshold_decay is None or 0 <= self.threshold_decay < 1,
              f"threshold_decay must be in [0, 1), got {self.threshold_decay}")
        non_negative(self, "calibration_rows")
        parse_prefixes(self.prefixes, self.m)


@register("topk")
class TopKSAE(AuxKSAE):
    """The configured rule on the pre-activations; x̂ sums the chosen decoder rows; FVU (per prefix) + AuxK."""

    config_class = TopKConfig
    data_parallel = True
    transcodes = True  # d_out > 0: a (skip) transcoder, scored on the target the trainer passes
    crosscodes = True  # sites > 1: a crosscoder; the whole atom (all sites) stays unit-norm

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.rule = select.ROW_RULES[cfg.selection]  # per row: the code (topk, abstopk) and AuxK's pick
        self.sizes = parse_prefixes(cfg.prefixes, cfg.m)
        if cfg.threshold_decay is not None:
            self.register_buffer("threshold", torch.tensor(-1.0))  # what inference uses; < 0: not estimated yet
            self.register_buffer("threshold_ema", torch.tensor(-1.0))  # training's running estimate

    def select(self, pre: Tensor) -> Code:
        k, m = self.cfg.k, self.cfg.m
        if self.cfg.selection != "batchtopk":
            return self.rule.pick(pre, k, m)
        if self.training or self.threshold < 0:
            return select.batchtopk(pre, k, m)
        return select.threshold(pre, self.threshold, m)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return self.select(self.pre_acts(x))

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        self.check_input(x)
        y = self.check_target(x, target)
        sparse = self.cfg.sparse_grad
        pre = self.pre_acts(x, grad=not sparse)
        code = self.select(pre)
        if self.training and self.cfg.threshold_decay is not None:
            self.update_threshold(code)
        out = self.sparse_output(x, pre, self.attach(x, code) if sparse else code, self.rule, sparse, y)
        out.losses.update(prefix_losses(y, out.code, self.sizes, lambda c: self.predict(x, c)))
        return out

    @torch.no_grad()
    def update_threshold(self, code: Code) -> None:
        """EMA of the smallest kept value, on the device (an empty batch leaves it as it is); inference uses
        it until `calibrate` replaces it."""
        active = code.active()
        low = distributed.smallest(torch.where(active, code.values.detach(), float("inf")).min())  # of all ranks
        d, ema = self.cfg.threshold_decay, self.threshold_ema
        ema.copy_(torch.where(low.isfinite(), torch.where(ema < 0, low, d * ema + (1 - d) * low), ema))
        self.threshold.copy_(ema)

    def calibration_rows(self) -> int:
        return self.cfg.calibration_rows if self.cfg.selection == "batchtopk" else 0

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Set the inference threshold midway between the k·N-th and next largest ReLU pre-activation of N rows,
        so that k·N of them lie above it: held-out L0 averages k. The EMA training reads is left as it is."""
        n, top = self.cfg.k * x.shape[0], x.new_empty(0)
        for rows in x.split(max(1, CALIBRATION_CHUNK // self.cfg.m)):  # the k·N + 1 largest so far, chunk by chunk
            flat = torch.cat([top, self.pre_acts(rows).relu().flatten()])  # as `encode` scores them
            top = flat.topk(min(n + 1, flat.numel())).values
        below = top[n] if top.numel() > n else top.new_zeros(())
        self.threshold.copy_((top[n - 1] + below) / 2)

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        if prefix + "threshold" in state and prefix + "threshold_ema" not in state and hasattr(self, "threshold_ema"):
            state[prefix + "threshold_ema"] = state[prefix + "threshold"]  # saved before the two were split
        super()._load_from_state_dict(state, prefix, *args, **kwargs)
