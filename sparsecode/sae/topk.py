"""TopK SAE (Gao et al. 2024) and the family built on it: one class, its rule chosen by the config.

`selection` picks the code from the pre-activations with a rule of select.py: `topk` (ReLU, the k largest
of each row), `abstopk` (the k largest |pre|, signed) or `batchtopk` (the k·B largest of the batch, and a
learned threshold at inference, `threshold_decay`). `prefixes` adds the nested-prefix loss (nested.py). AuxK
revives dead latents (auxk.py). The registered names are configs of this class with their own defaults:
`topk` here, `abstopk`, `batchtopk` and `matryoshka` in their modules; selection, prefixes and
threshold_decay are options only where they do something (plain class constants elsewhere).

With `sparse_grad` (the default) the [B, m] pre-activations are scored without autograd and only the
picked ones are made differentiable (kernels/sparse_encoder.py): the encoder's backward costs O(B·k·d)
instead of two dense matmuls. `sparse_grad=false` is the dense reference path; both give the same
gradients (tests/test_kernels.py, tests/test_topk.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..code import Code
from ..coder import Output, register
from ..config import check
from . import select
from .auxk import AuxKConfig, AuxKSAE
from .nested import parse_prefixes, prefix_losses


@dataclass
class TopKConfig(AuxKConfig):
    sparse_grad: bool = True  # encoder gradients only for the picked latents (False: dense reference)
    # not options of `topk` (no annotation: class constants); registered configs make them options
    selection = "topk"  # topk | abstopk | batchtopk: the rule of select.py that picks the code
    prefixes = "1"  # fractions of m whose prefixes each reconstruct x alone (nested.py); "1": none but m
    threshold_decay = None  # EMA decay of the inference threshold (an option of batchtopk); None: none held

    def validate(self) -> None:
        super().validate()
        check(self.selection in select.ROW_RULES,
              f"selection must be one of {', '.join(select.ROW_RULES)}, got {self.selection!r}")
        check(self.selection != "batchtopk" or self.threshold_decay is not None,
              "selection=batchtopk needs an inference threshold (threshold_decay)")
        check(self.threshold_decay is None or 0 <= self.threshold_decay < 1,
              f"threshold_decay must be in [0, 1), got {self.threshold_decay}")
        parse_prefixes(self.prefixes, self.m)


@register("topk")
class TopKSAE(AuxKSAE):
    """The configured rule on the pre-activations; x̂ sums the chosen decoder rows; FVU (per prefix) + AuxK."""

    config_class = TopKConfig

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.rule = select.ROW_RULES[cfg.selection]  # per row: the code (topk, abstopk) and AuxK's pick
        self.sizes = parse_prefixes(cfg.prefixes, cfg.m)
        if cfg.threshold_decay is not None:
            self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

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

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        sparse = self.cfg.sparse_grad
        pre = self.pre_acts(x, grad=not sparse)
        code = self.select(pre)
        if self.training and self.cfg.threshold_decay is not None:
            self.update_threshold(code)
        out = self.sparse_output(x, pre, self.attach(x, code) if sparse else code, self.rule, sparse)
        out.losses.update(prefix_losses(x, out.code, self.sizes, self.decode))
        return out

    @torch.no_grad()
    def update_threshold(self, code: Code) -> None:
        """EMA of the smallest kept value, on the device (an empty batch leaves the threshold as it is)."""
        active = code.active()
        low = torch.where(active, code.values.detach(), float("inf")).min()
        d = self.cfg.threshold_decay
        new = torch.where(self.threshold < 0, low, d * self.threshold + (1 - d) * low)
        self.threshold.copy_(torch.where(active.any(), new, self.threshold))
