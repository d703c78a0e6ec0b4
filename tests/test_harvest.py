"""Harvest: stored activations equal a direct forward hook; resume after a kill equals a straight run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from data_helpers import corpus_texts, gpt2_dir, minilm_dir, write_corpus  # noqa: F401
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from sparsecode.cli import Parser
from sparsecode.data.harvest import HarvestConfig, add_harvest_command, harvest
from sparsecode.data.store import Store
from sparsecode.errors import SparsecodeError
from sparsecode.model import load_model


def direct_rows(model, tok, module, texts, context, bos, sep, cls_sep=False):
    """Re-derive the harvest independently: pack documents, run each context alone, hook `module`."""
    stream = []
    for text in texts:
        stream += [(t, True) for t in tok.encode(text, add_special_tokens=False)] + [(sep, False)]
    content = context - (2 if cls_sep else 1)
    rows, ids = [], []
    captured = []
    handle = module.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple)
                                                                          else out))
    for i in range(0, len(stream), content):
        chunk = stream[i : i + content]
        inp = [bos] + [t for t, _ in chunk] + ([sep] if cls_sep else [])
        with torch.no_grad():
            model(input_ids=torch.tensor([inp]))
        h = captured.pop()[0]
        for j, (t, keep) in enumerate(chunk):
            if keep:
                rows.append(h[1 + j])
                ids.append(t)
    handle.remove()
    return torch.stack(rows), torch.tensor(ids)


def test_gpt2_store_equals_forward_hook(gpt2_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    m = harvest(HarvestConfig(out=str(tmp_path / "s"), model=str(gpt2_dir), hook="transformer.h.1",
                              corpus=str(corpus), tokens=10**6, context=16, dtype="fp32", shard_tokens=100,
                              batch_contexts=4))
    store = Store(tmp_path / "s")
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    want, ids = direct_rows(model, tok, model.transformer.h[1], corpus_texts(corpus), 16, tok.bos_token_id,
                            tok.eos_token_id)
    idx = torch.arange(store.n)
    assert m["tokens"] == store.n == len(want) and m["d"] == 32 and len(m["shards"]) > 2
    assert torch.equal(store.gather(idx, "tokens"), ids)
    torch.testing.assert_close(store.gather(idx), want, rtol=1e-6, atol=1e-6)
    doc, pos = store.gather(idx, "doc"), store.gather(idx, "pos")
    assert doc[0] == 0 and pos[0] == 0 and doc[-1] == len(corpus_texts(corpus)) - 1
    assert torch.equal(pos[1:][doc[1:] == doc[:-1]], pos[:-1][doc[1:] == doc[:-1]] + 1)


def test_gpt2_input_hook_is_previous_output(gpt2_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    common = dict(model=str(gpt2_dir), corpus=str(corpus), tokens=300, context=16, dtype="fp32")
    harvest(HarvestConfig(out=str(tmp_path / "in"), hook="transformer.h.1", hook_point="input", **common))
    harvest(HarvestConfig(out=str(tmp_path / "out"), hook="transformer.h.0", **common))
    a, b = Store(tmp_path / "in"), Store(tmp_path / "out")
    assert a.n == b.n == 300
    assert torch.equal(a.gather(torch.arange(300)), b.gather(torch.arange(300)))


def test_minilm_store_equals_forward_hook(minilm_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c", docs=6)
    harvest(HarvestConfig(out=str(tmp_path / "s"), model="minilm", hook="encoder.layer.3", corpus=str(corpus),
                          tokens=200, context=32, dtype="fp32"))
    store = Store(tmp_path / "s")
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    want, ids = direct_rows(model, tok, model.encoder.layer[3], corpus_texts(corpus), 32, tok.cls_token_id,
                            tok.sep_token_id, cls_sep=True)
    assert store.n == 200 and store.d == 384
    assert torch.equal(store.gather(torch.arange(200), "tokens"), ids[:200])
    torch.testing.assert_close(store.gather(torch.arange(200)), want[:200], rtol=1e-6, atol=1e-6)


def store_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != ".lock"}  # the lock holds a pid


@pytest.mark.parametrize("fmt,dtype", [("safetensors", "fp16"), ("npy", "bf16")])
def test_interrupted_harvest_resumes_to_the_same_store(gpt2_dir, tmp_path, fmt, dtype):  # noqa: F811
    corpus = write_corpus(tmp_path / "c", docs=20)
    cfg = dict(model=str(gpt2_dir), hook="transformer.h.0", corpus=str(corpus), tokens=700, context=16,
               dtype=dtype, file_format=fmt, shard_tokens=90, batch_contexts=3)
    harvest(HarvestConfig(out=str(tmp_path / "straight"), **cfg))

    def die(n):
        if n == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harvest(HarvestConfig(out=str(tmp_path / "resumed"), **cfg), on_shard=die)
    partial = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert not partial["complete"] and partial["tokens"] == 270
    harvest(HarvestConfig(out=str(tmp_path / "resumed"), **cfg))
    assert store_files(tmp_path / "straight") == store_files(tmp_path / "resumed")
    again = harvest(HarvestConfig(out=str(tmp_path / "resumed"), **cfg))  # complete: nothing to do
    assert again["tokens"] == 700 and store_files(tmp_path / "straight") == store_files(tmp_path / "resumed")


def test_resume_with_other_settings_is_refused(gpt2_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    cfg = dict(model=str(gpt2_dir), hook="transformer.h.0", corpus=str(corpus), tokens=100, context=16)
    harvest(HarvestConfig(out=str(tmp_path / "s"), **cfg))
    with pytest.raises(SparsecodeError, match="dtype differ"):
        harvest(HarvestConfig(out=str(tmp_path / "s"), **{**cfg, "dtype": "fp32"}))


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


def test_unknown_hook_names_the_closest_modules(gpt2_dir, tmp_path):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    with pytest.raises(SparsecodeError) as e:
        harvest(HarvestConfig(out=str(tmp_path / "s"), model=str(gpt2_dir), hook="transformer.h.7",
                              corpus=str(corpus), tokens=50))
    assert "transformer.h.1" in one_line(e) and "transformer.h.7" in one_line(e)
    assert not (tmp_path / "s").exists()


def test_missing_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparsecodeError) as e:
        load_model("nobody-here/no-such-model")
    assert "no-such-model" in one_line(e)
    with pytest.raises(SparsecodeError) as e:
        load_model(str(tmp_path))  # a folder without a model
    one_line(e)


def test_empty_corpus_is_one_line(gpt2_dir, tmp_path):  # noqa: F811
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("  \n")
    with pytest.raises(SparsecodeError) as e:
        harvest(HarvestConfig(out=str(tmp_path / "s"), model=str(gpt2_dir), hook="transformer.h.0",
                              corpus=str(tmp_path / "c"), tokens=50))
    assert "empty" in one_line(e)


def test_cli_command(gpt2_dir, tmp_path, capsys):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    p = Parser(prog="sparsecode")
    add_harvest_command(p.add_subparsers(dest="command", parser_class=Parser))
    a = p.parse_args(["harvest", "--model", str(gpt2_dir), "--hook", "transformer.h.1", "--corpus", str(corpus),
                      "--tokens", "2e2", "--context", "16", "--shard-tokens", "64", "--out", str(tmp_path / "s"),
                      "--no-progress", "--device", "cpu"])
    assert a.fn(a) == 0
    assert "stored 200 tokens" in capsys.readouterr().out
    assert Store(tmp_path / "s").n == 200 and len(Store(tmp_path / "s").shards) == 4
    with pytest.raises(SparsecodeError):
        p.parse_args(["harvest", "--out", "x", "--dtype", "fp8"])


@pytest.mark.slow
def test_sigkilled_harvest_resumes_to_the_same_store(tmp_path):
    corpus = write_corpus(tmp_path / "c", docs=200, words=120)
    args = [sys.executable, "-c", "import sys; from sparsecode.data.harvest import cmd_harvest, add_harvest_command;"
            "from sparsecode.cli import Parser; p = Parser(); add_harvest_command(p.add_subparsers());"
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.fn(a))", "harvest", "--corpus", str(corpus),
            "--tokens", "12000", "--context", "64", "--shard-tokens", "1000", "--batch-contexts", "8",
            "--no-progress", "--device", "cpu"]
    subprocess.run(args + ["--out", str(tmp_path / "straight")], check=True)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "killed")])
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads(manifest.read_text())["complete"]
    subprocess.run(args + ["--out", str(tmp_path / "killed")], check=True)
    assert store_files(tmp_path / "straight") == store_files(tmp_path / "killed")


def test_a_model_folder_without_a_tokenizer_is_named_and_leaves_no_store(gpt2_dir, tmp_path, capsys):  # noqa: F811
    import shutil

    from sparsecode.cli import main

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in gpt2_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, bare)
    corpus = write_corpus(tmp_path / "c")
    args = ["harvest", "--model", str(bare), "--hook", "transformer.h.0", "--corpus", str(corpus), "--tokens", "50",
            "--context", "16", "--no-progress", "--out", str(tmp_path / "s")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer; pass --tokenizer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
    assert main(args + ["--tokenizer", str(gpt2_dir)]) == 0
    assert Store(tmp_path / "s").n == 50


def test_the_harvest_command_keeps_the_config_defaults(monkeypatch):
    """Flags left out keep HarvestConfig's defaults (the CLI repeats none); --no-prepend-bos reaches it."""
    import sparsecode.data.harvest as harvest_module

    seen = []
    monkeypatch.setattr(harvest_module, "harvest", lambda cfg, progress: seen.append(cfg) or {})
    p = Parser(prog="sparsecode")
    add_harvest_command(p.add_subparsers(dest="command", parser_class=Parser))
    for argv in (["harvest", "--out", "s"], ["harvest", "--out", "s", "--no-prepend-bos", "--context", "64"]):
        a = p.parse_args(argv)
        with pytest.raises((KeyError, TypeError)):
            a.fn(a)  # stops at the fake harvest's empty manifest
    assert seen[0] == HarvestConfig(out="s")
    assert seen[1] == HarvestConfig(out="s", prepend_bos=False, context=64)
