import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsecode.data.source import TensorSource  # noqa: E402
from sparsecode.errors import SparsecodeError  # noqa: E402
from sparsecode.model import Hooked, load_model  # noqa: E402
from sparsecode.splice import reconstruct_with, spliced_loss  # noqa: E402
from sparsecode.train import TrainConfig, train  # noqa: E402


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_perfect_reconstruction_gives_clean_loss_and_zero_ablation_gives_zero(gpt2):
    ids = torch.randint(0, 97, (6, 20), generator=torch.Generator().manual_seed(1))
    perfect = spliced_loss(gpt2, "transformer.h.0", lambda a: a.clone(), ids)
    assert perfect["metric"] == "next-token CE"
    assert abs(perfect["loss_spliced"] - perfect["loss_clean"]) < 1e-5
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["loss_zero"] != pytest.approx(perfect["loss_clean"], abs=1e-3)
    zero = spliced_loss(gpt2, "transformer.h.0", torch.zeros_like, ids)
    assert zero["loss_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_only_chosen_positions_are_replaced(gpt2):
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    where = torch.zeros(2, 10, dtype=torch.bool)
    r = spliced_loss(gpt2, "transformer.h.1", torch.zeros_like, ids, where=where)
    assert r["loss_spliced"] == pytest.approx(r["loss_clean"], abs=1e-6)


def test_unknown_hook_is_one_line(gpt2):
    with pytest.raises(SparsecodeError, match="no module 'transformer.h.9'; closest: transformer.h"):
        spliced_loss(gpt2, "transformer.h.9", torch.zeros_like, torch.zeros(1, 4, dtype=torch.long))


def test_trained_code_on_minilm_lands_between_zero_and_clean(tmp_path):
    model, tok, _ = load_model("minilm")
    texts = [m.__doc__ for m in (json, re, pytest, torch.nn.functional, transformers.PreTrainedModel) if m.__doc__]
    enc = tok(texts * 4, truncation=True, max_length=64, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    acts = Hooked(model, "encoder.layer.3")(ids, mask)  # [N, T, 384]
    rows = acts[mask.bool()]
    sae = train(TrainConfig(method="topk", coder={"m": 1024, "k": 24, "dead_tokens": 20_000}, steps=300,
                            batch_size=256, lr=2e-3, log_every=100), tmp_path / "run", source=TensorSource(rows))
    r = spliced_loss(model, "encoder.layer.3", reconstruct_with(sae), ids[:8], mask[:8], where=mask[:8].bool())
    assert r["metric"] == "1 - cos(pooled embedding)" and r["loss_clean"] == pytest.approx(0, abs=1e-6)
    assert 0.2 < r["loss_recovered"] < 1.0, r
