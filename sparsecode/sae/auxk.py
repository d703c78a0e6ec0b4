"""AuxK (Gao et al. 2024), shared by every SAE that picks a few latents per row (topk and its registered
configs, topafa, vsae): the one place its loss and the training output around it are computed.

The residual x − x̂ is reconstructed by the top `aux_k` latents among those dead for `dead_tokens` tokens,
weighted by `aux_coef` (1/32 in the paper); both losses share the FVU scale. The paper's window is 10M tokens,
longer than many runs: by default (None) the trainer ties it to the run, a twentieth of its tokens capped at 10M
(`coder.auto_dead_tokens`), so AuxK acts within any run. The latents are picked by the
method's per-row rule (`select.Rule`), which also says how live latents are hidden from the pick.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..code import Code, decode
from ..coder import Output, SparseConfig
from ..config import check, non_negative
from ..metrics import fvu, total_variance
from .base import SAE
from .select import Rule


@dataclass
class AuxKConfig(SparseConfig):
    k: int = 32  # active latents per token
    aux_k: int | None = None  # dead latents used by AuxK; None → d_in // 2
    aux_coef: float = 1 / 32

    def validate(self) -> None:
        super().validate()
        check(self.aux_k is None or self.aux_k > 0, f"aux_k must be positive, got {self.aux_k}")
        non_negative(self, "aux_coef")


class AuxKSAE(SAE):
    """An SAE trained on FVU + AuxK. Its forward picks a code and calls `sparse_output`."""

    config_class = AuxKConfig

    def sparse_output(self, x: Tensor, pre: Tensor, code: Code, rule: Rule, sparse_grad: bool,
                      target: Tensor | None = None) -> Output:
        """Decode `code` (plus a transcoder's skip path); in training add AuxK over `pre` (the scores the code
        was picked from) and track usage. `sparse_grad`: `pre` has no autograd, and AuxK's picks get theirs
        through `attach`. `target`: what a transcoder's output is scored against (None: x)."""
        x_hat = self.predict(x, code)
        y = x if target is None else target
        losses = {"fvu": fvu(y, x_hat)}
        if self.training:
            aux = self.aux_loss(x, x_hat, pre, rule, sparse_grad, y)
            if aux is not None:
                losses["auxk"] = self.cfg.aux_coef * aux
            self.track(code)
        return Output(x_hat, code, losses)

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre: Tensor, rule: Rule, sparse_grad: bool,
                 target: Tensor | None = None) -> Tensor | None:
        """Reconstruct the residual (of `target`, a transcoder's, else of x) with the top latents among the dead
        ones (None if none is dead).

        Nothing waits for the device (`idle_count`): on the CPU the number dead is read, k_aux = min(aux_k,
        dead). On a GPU only a bound on the longest idle time is known on the host: None while it is below
        dead_tokens, then always k_aux = min(aux_k, m) slots, those that fall on live latents weighing zero
        (the loss is zero when none is dead), as in the paper's reference code.
        """
        longest, n_dead = self.idle_count()
        if longest < self.dead_tokens or n_dead == 0:
            return None
        m, dead = self.cfg.m, self.dead_mask()
        k_aux = min(self.cfg.aux_k or self.cfg.d_in // 2, m if n_dead is None else n_dead)
        y = x if target is None else target
        residual = (y - x_hat).detach()
        top = rule.pick(pre.masked_fill(~dead, rule.hide), k_aux, m)
        if n_dead is None:  # slots beyond the dead latents hold live ones: weight zero
            top = Code(top.indices, top.values * dead[top.indices], m)
        r_hat = decode(self.attach(x, top) if sparse_grad else top, self.W_dec)
        loss = (residual - r_hat).pow(2).sum() / total_variance(y)
        return loss if n_dead is not None else dead.any() * loss
