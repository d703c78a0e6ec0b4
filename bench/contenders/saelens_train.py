"""SAELens trained on a store as bench/sae_real.py trains sparsecode's SAEs: same rows in the same order, same
m, k, batch, steps and lr, same held-out rows, the same metrics (sparsecode's CodeStats).

Runs in the peers' venv (.venv-bench, where sparsecode is importable for its store reader and its metrics).
Training goes through SAELens's own `SAETrainer.fit` with an iterator of activation batches as its data provider
(its API for activations that are already on hand): its Adam, its clip_grad_norm_(1.0), its lr scheduler and its
dead-latent window, each at its default (constant lr, no warm-up, dead_feature_window 1,000 steps). The rows:
sparsecode's trainer reads `init_rows` rows for its data init before the first step; they are read here too and
not used (SAELens has no data init), so both see the same 700 batches. After training the SAE is saved as its
inference SAE and loaded back (`save_inference_model` → `SAE.load_from_disk`), as a user would: BatchTopK and
Matryoshka become JumpReLU SAEs with the trained `topk_threshold`, TopK's decoder norms are folded.

Prints one JSON line: FVU, L0, dead on the held-out rows (never fired), trainer dead (idle for at least
`--dead-window-steps` steps, sparsecode's window, and by SAELens's own window), seconds of training.

    .venv-bench/bin/python bench/contenders/saelens_train.py --store runs/stores/minilm-h --arch topk \
        -m 4096 -k 32 --steps 700 --lr 1e-3 --eval-rows 32768
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch
from heldout import held_out_stats  # bench/contenders/heldout.py

from sparsecode.data.source import SourceConfig, open_source
from sparsecode.sae.base import dense_to_code

ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard")


def build(a, d: int):
    """The SAELens training SAE for `a.arch`, at its defaults except d_sae, k (and the sparsity coefficient)."""
    if a.arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=a.m, k=a.k))
    if a.arch == "batchtopk":
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=a.m, k=a.k))
    if a.arch == "matryoshka_batchtopk":
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )
        widths = [int(w) for w in a.widths.split(",")]  # no default in SAELens: sparsecode's prefixes
        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d, d_sae=a.m, k=a.k, matryoshka_widths=widths))
    if a.arch == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        kw = {} if a.coef is None else {"l0_coefficient": a.coef}
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=a.m, **kw))
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    kw = {} if a.coef is None else {"l1_coefficient": a.coef}
    return StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=a.m, **kw))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--heldout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="the store reader's seed (sparsecode's SourceConfig.seed)")
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("-m", type=int, default=4096)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--coef", type=float, default=None, help="l1_coefficient (standard) / l0_coefficient (jumprelu)")
    p.add_argument("--widths", default="256,512,1024,2048,4096", help="matryoshka_widths")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--skip-rows", type=int, default=16384, help="rows sparsecode reads for its init (not used here)")
    p.add_argument("--eval-rows", type=int, default=32768)
    p.add_argument("--dead-window-steps", type=int, default=70, help="sparsecode's dead window, in steps")
    p.add_argument("--dead-feature-window", type=int, default=None,
                   help="SAELens's dead_feature_window (steps; AuxK's window); default: its own, 1,000")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(a.seed)
    cfg = SourceConfig(kind="store", path=a.store, heldout=a.heldout, seed=a.seed)
    train = open_source(cfg, "train")
    if a.skip_rows:
        train.next_batch(a.skip_rows)

    def batches():
        while True:
            yield train.next_batch(a.batch).float()

    sae = build(a, train.d)
    # lr_end: the runner's default, lr / 10 (SAETrainerConfig leaves it None; only decaying schedules read it)
    tcfg = SAETrainerConfig(total_training_samples=a.steps * a.batch, train_batch_size_samples=a.batch, lr=a.lr,
                            lr_end=a.lr / 10, device="cpu",
                            **({} if a.dead_feature_window is None else {"dead_feature_window": a.dead_feature_window}))
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=batches())
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    idle = trainer.n_forward_passes_since_fired
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp, device="cpu").eval()
    def forward(x):
        z = inference.encode(x)
        return inference.decode(z), dense_to_code(z, a.m)

    stats = held_out_stats(cfg, a.m, a.eval_rows, forward)
    r = stats.result()
    print(json.dumps({"rows": stats.rows, "fvu": r["fvu"], "l0": r["l0"], "dead_heldout": r["never_fired"],
                      "dead_trainer": (idle >= a.dead_window_steps).float().mean().item(),
                      "dead_trainer_own": trainer.dead_neurons.float().mean().item(),
                      "inference": type(inference).__name__, "seconds": seconds}))


if __name__ == "__main__":
    main()
