"""Plain-PyTorch dense TopK SAE written here: the speed baseline, and the reference of the quality check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from throughput_harness import LR, Contender, autocast, module_state_bytes
from torch import Tensor, nn


class DenseTopK(nn.Module):
    """Plain-PyTorch TopK SAE: sparsecode's TopK algorithm (ReLU of the top k, AuxK, unit-norm atoms) with the
    obvious dense decoder z @ W_dec. The speed baseline, and the reference of the quality check."""

    def __init__(self, d: int, m: int, k: int, dead_tokens: int = 1_000_000, aux_coef: float = 1 / 32):
        super().__init__()
        w = F.normalize(torch.randn(m, d), dim=1)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("since_fired", torch.zeros(m, dtype=torch.long))
        self.k, self.dead_tokens, self.aux_coef = k, dead_tokens, aux_coef

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
        x_hat = z @ self.W_dec + self.b_dec
        tv = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        loss = (x - x_hat).pow(2).sum() / tv
        if self.training:
            dead = self.since_fired >= self.dead_tokens
            n_dead = int(dead.sum())
            if n_dead:
                av, ai = pre.masked_fill(~dead, float("-inf")).topk(min(x.shape[1] // 2, n_dead), dim=1,
                                                                    sorted=False)
                r_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ self.W_dec
                loss = loss + self.aux_coef * ((x - x_hat).detach() - r_hat).pow(2).sum() / tv
            with torch.no_grad():
                self.since_fired += x.shape[0]
                self.since_fired[(z != 0).any(0)] = 0
        return x_hat, loss


def plain_trainer(sae: DenseTopK, dev: torch.device, amp: bool, lr_factor: Callable[[int], float]):
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    def step(x: Tensor):
        with autocast(dev, amp):
            _, loss = sae(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g, w = sae.W_dec.grad, sae.W_dec
            g -= (g * w).sum(1, keepdim=True) * w
        torch.nn.utils.clip_grad_norm_(list(sae.parameters()), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        return loss

    return step, opt


def build(sizes: dict[str, int], x: Tensor, dev: torch.device, run: Path, args) -> Contender:
    sae = DenseTopK(sizes["d"], sizes["m"], sizes["k"]).to(dev)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    step, opt = plain_trainer(sae, dev, True, lambda s: 1.0)
    return Contender("plain PyTorch (dense)", "plain", step, lambda: module_state_bytes(sae, [opt]),
                     "[autocast] addmm encoder → topk → scatter into dense z [B, m] → z @ W_dec → FVU (+AuxK) → "
                     "backward → parallel-grad removal → clip_grad_norm_(1.0) → Adam.step → renorm")
