"""Several hooks from one forward pass: each hook's coder equals the single-hook run on that hook, its run folder
reopens alone, and a pattern that matches nothing is one line."""

from __future__ import annotations

import pytest
import torch
from data_helpers import gpt2_dir, write_corpus  # noqa: F401
from safetensors.torch import load_file

from sparsecode.checkpoint import latest_checkpoint
from sparsecode.cli import main
from sparsecode.data.stream import ModelStream, StreamConfig
from sparsecode.files import read_jsonl
from sparsecode.train import load_config


def train_args(gpt2_dir, corpus, out, *extra):  # noqa: F811
    opts = [f"model={gpt2_dir}", f"corpus={corpus}", "context=16", "batch_contexts=4", "buffer_rows=150",
            "device=cpu"]
    return ["train", "--method", "topk", "-m", "48", "-k", "4", "--set", "dead_tokens=128", "--source", "model",
            *[x for o in opts for x in ("--source-opt", o)], "--steps", "20", "--batch-size", "32",
            "--log-every", "5", "--ckpt-every", "10", "--seed", "3", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def weights(run):
    return load_file(latest_checkpoint(run) / "model.safetensors")


def test_two_hooks_from_one_pass_equal_the_single_hook_runs(gpt2_dir, tmp_path, capsys):  # noqa: F811
    corpus = write_corpus(tmp_path / "c", docs=12)
    assert main(train_args(gpt2_dir, corpus, tmp_path / "multi", "--hook", "transformer.h.*")) == 0
    out = capsys.readouterr().out
    assert out.count("run written to") == 2
    for hook in ("transformer.h.0", "transformer.h.1"):
        single = tmp_path / f"single-{hook}"
        assert main(train_args(gpt2_dir, corpus, single, "--source-opt", f"hook={hook}")) == 0
        multi = tmp_path / "multi" / hook
        a, b = weights(multi), weights(single)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{hook} {key}"
        drop = ("tokens_per_s",)
        assert [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(multi / "metrics.jsonl")] == \
            [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(single / "metrics.jsonl")]
        assert load_config(multi).source.options["hook"] == hook  # the run reopens alone as a single-hook run
    assert main(train_args(gpt2_dir, corpus, tmp_path / "multi", "--hook", "transformer.h.*", "--resume",
                           "--steps", "25")) == 0  # both resume from step 20 in one pass
    assert main(train_args(gpt2_dir, corpus, tmp_path / "single-transformer.h.0", "--source-opt",
                           "hook=transformer.h.0", "--resume", "--steps", "25")) == 0
    for key, value in weights(tmp_path / "multi" / "transformer.h.0").items():
        assert torch.equal(value, weights(tmp_path / "single-transformer.h.0")[key]), key


def test_hook_patterns(gpt2_dir, tmp_path, capsys):  # noqa: F811
    corpus = write_corpus(tmp_path / "c", docs=4)
    spec = StreamConfig(model=str(gpt2_dir), corpus=str(corpus), context=16, device="cpu")
    stream = ModelStream(spec, hooks=["transformer.h.1.mlp", "transformer.h.*"])
    assert stream.hooks == ["transformer.h.0", "transformer.h.1", "transformer.h.1.mlp"]  # model order, once each
    assert stream.widths == [32, 32, 32] and stream.next_batch(5).shape == (5, 96)
    assert main(train_args(gpt2_dir, corpus, tmp_path / "x", "--hook", "encoder.layer.*")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'encoder.layer.*' matches no module" in err
    assert main(train_args(gpt2_dir, corpus, tmp_path / "x", "--hook", "transformer.h.0", "--source-opt",
                           "hook=transformer.h.1")) == 2
    assert "not --source-opt hook" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("hooks", [["transformer.h.0", "transformer.h.1"]])
def test_the_stream_of_several_hooks_is_each_hooks_stream(gpt2_dir, tmp_path, hooks):  # noqa: F811
    corpus = write_corpus(tmp_path / "c", docs=6)
    spec = StreamConfig(model=str(gpt2_dir), corpus=str(corpus), context=16, batch_contexts=4, buffer_rows=100,
                        device="cpu")
    both = ModelStream(spec, seed=5, hooks=hooks)
    rows = torch.cat([both.next_batch(70) for _ in range(5)])  # across windows and the epoch's end
    for i, hook in enumerate(hooks):
        alone = ModelStream(StreamConfig(**{**vars(spec), "hook": hook}), seed=5)
        assert torch.equal(torch.cat([alone.next_batch(70) for _ in range(5)]), rows[:, 32 * i : 32 * (i + 1)])
    assert both.state_dict() == alone.state_dict()
