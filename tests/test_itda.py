import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sae_helpers import SUPERPOSITION, assert_same_encode, one_thread
from safetensors.torch import load_file

from sparsecode.checkpoint import latest_checkpoint, load_coder
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.evaluate import evaluate
from sparsecode.train import TrainConfig, Trainer


def test_itda_builds_from_data_rows_without_gradient_steps():
    """Atoms are the stream's normalised rows at their stored source indices and rebuild those rows alone."""
    src = SourceConfig(kind="synthetic", options=SUPERPOSITION)
    cfg = TrainConfig(method="itda", coder={"m": 128, "k": 4, "max_error": 0.2}, source=src, steps=40,
                      batch_size=512, init_rows=2048, ckpt_every=40)
    with tempfile.TemporaryDirectory() as d, one_thread():
        trainer = Trainer(cfg, Path(d), progress=False)
        assert trainer.opt is None and not list(trainer.coder.parameters())  # nothing to take a step on
        trainer.start()
        itda = trainer.fit()
        n = int(itda.n_atoms)
        assert 64 <= n <= 128
        # atoms are the normalised rows of the stream at their stored source indices
        replay = open_source(src, "train")  # same batch sizes: the synthetic stream depends on them
        stream = torch.cat([replay.next_batch(2048)] + [replay.next_batch(512) for _ in range(40)])
        idx = itda.source_index[:n]
        assert (idx >= 0).all() and len(idx.unique()) == n
        torch.testing.assert_close(itda.W_dec[:n], F.normalize(stream[idx], dim=1))
        assert (itda.source_index[n:] == -1).all()
        saved = load_file(latest_checkpoint(Path(d)) / "model.safetensors")
        assert torch.equal(saved["source_index"], itda.source_index)
        loaded = load_coder(Path(d))
        assert torch.equal(loaded.source_index, itda.source_index)
        assert_same_encode(itda, loaded, open_source(src, "eval").next_batch(256))
        # each atom's source row is rebuilt from its own atom alone: one weight, the row's norm; the rest ~0
        rows = stream[idx]
        code = itda.encode(rows)
        torch.testing.assert_close(itda.decode(code), rows, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(itda.W_dec[code.indices[:, 0]], itda.W_dec[:n])
        torch.testing.assert_close(code.values[:, 0], rows.norm(dim=1))
        assert code.k == 4 and code.values[:, 1:].abs().max() < 1e-5
        r = evaluate(itda, open_source(src, "eval"), rows=4096)
        assert r["fvu"] < 0.2, r
