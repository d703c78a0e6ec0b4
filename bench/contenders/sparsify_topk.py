"""EleutherAI sparsify `SparseCoder`, driven as its trainer does."""

from __future__ import annotations

from pathlib import Path

import torch
from throughput_harness import LR, Contender, module_state_bytes
from torch import Tensor


def build(sizes: dict[str, int], x: Tensor, dev: torch.device, run: Path, args) -> Contender:
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    d, m, k = sizes["d"], sizes["m"], sizes["k"]
    sae = SparseCoder(d, SparseCoderConfig(k=k, num_latents=m), device=dev)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    sched = get_linear_schedule_with_warmup(opt, 1000, 10**9)
    since_fired = torch.zeros(m, dtype=torch.long, device=dev)
    did_fire = torch.zeros(m, dtype=torch.bool, device=dev)
    auxk_alpha, threshold = 1 / 32, 10_000_000  # sparsify's 'auxk_alpha' is 0 by default; enable AuxK

    def step(x: Tensor):
        # the order of sparsify.Trainer.fit for an SAE-local 'fvu' loss, one micro-batch
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = since_fired > threshold
        out = sae(x, dead_mask=dead_mask)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
        return loss

    return Contender("sparsify", "sparsify", step, lambda: module_state_bytes(sae, [opt]),
                     "as sparsify.Trainer.fit: set_decoder_norm_to_unit_norm → SparseCoder(x, dead_mask) "
                     "[own cuda autocast; fused_encoder; Triton decoder if installed] → fvu + auxk/32 → backward "
                     "→ remove_gradient_parallel_to_decoder_directions → Adam.step → zero_grad → "
                     "linear warm-up schedule.step → tokens-since-fired update")
