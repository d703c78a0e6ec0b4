"""Transcoders: codes of one site decoded to another (synthetic maps recovered, skip path, paired harvest, splice)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from data_helpers import gpt2_dir, write_corpus  # noqa: F401
from transformers import AutoModelForCausalLM

from sparsecode.checkpoint import load_coder
from sparsecode.cli import main
from sparsecode.coder import build
from sparsecode.data.harvest import HarvestConfig, harvest
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.data.store import Store
from sparsecode.errors import SparsecodeError
from sparsecode.metrics import fvu
from sparsecode.splice import splice_store, spliced_loss, transcode_with
from sparsecode.train import TrainConfig, Trainer, train

MAP = dict(d=48, d_out=32, n_features=48, active=3.0, alpha=0.0)  # y = A·f, x = B·f, 3 features a row
DENSE = dict(MAP, input_noise=0.1, dense=1.0)  # y = A·f + C·x, x with a dense part f does not explain


def fit(tmp_path, name, options, coder, steps=600):
    cfg = TrainConfig(method="topk", coder=coder, source=SourceConfig(kind="sparse_map", options=options),
                      steps=steps, batch_size=512, lr=5e-3, log_every=100, ckpt_every=10_000, device="cpu")
    trainer = Trainer(cfg, tmp_path / name, progress=False)
    trainer.start()
    held = open_source(cfg.source, "eval")
    rows = held.next_batch(4096)
    return trainer.fit(), rows[:, :held.d], rows[:, held.d:], held.truth


def test_topk_transcoder_recovers_a_sparse_map(tmp_path):
    coder, x, y, truth = fit(tmp_path, "plain", MAP, dict(m=64, k=6))
    with torch.no_grad():
        assert coder.W_dec.shape == (64, 32) and coder.b_dec.shape == (32,)
        score = fvu(y, coder.transcode(x)).item()
        assert score < 0.1
        cos = F.normalize(truth, dim=1) @ F.normalize(coder.W_dec, dim=1).t()
        assert (cos.max(1).values > 0.9).float().mean() >= 0.9  # columns of A, each matched by an atom
        # the training loss "fvu" is the target's, not the input's
        assert torch.isclose(coder(x, target=y).losses["fvu"], torch.tensor(score), rtol=1e-5)


def test_skip_transcoder_beats_the_plain_one_on_a_dense_part(tmp_path):
    plain, x, y, _ = fit(tmp_path, "plain", DENSE, dict(m=64, k=6))
    skip, _, _, _ = fit(tmp_path, "skip", DENSE, dict(m=64, k=6, skip=True))
    with torch.no_grad():
        f_plain, f_skip = fvu(y, plain.transcode(x)).item(), fvu(y, skip.transcode(x)).item()
    assert skip.W_skip.shape == (32, 48)
    assert f_skip < 0.6 * f_plain, (f_skip, f_plain)


def test_skip_starts_at_zero_and_is_in_the_output():
    coder = build("topk", dict(d_in=6, m=8, k=2, d_out=4, skip=True))
    x = torch.randn(3, 6)
    assert torch.equal(coder.W_skip, torch.zeros(4, 6))
    with torch.no_grad():
        coder.W_skip.normal_()
        code = coder.encode(x)
        assert torch.allclose(coder.transcode(x), coder.decode(code) + x @ coder.W_skip.t())
        assert torch.allclose(coder(x, target=torch.zeros(3, 4)).x_hat, coder.transcode(x))


def test_transcoder_run_resumes_exactly(tmp_path):
    src = SourceConfig(kind="sparse_map", options=dict(MAP, dense=0.5))
    cfg = TrainConfig(method="batchtopk", coder=dict(m=32, k=4, skip=True), source=src, steps=12, batch_size=64,
                      log_every=4, ckpt_every=6, device="cpu")
    straight = train(cfg, tmp_path / "a")
    cfg.steps = 6
    train(cfg, tmp_path / "b")
    cfg.steps = 12
    resumed = train(cfg, tmp_path / "b", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "b" / "config.json").read_text())["coder"]["d_out"] == 32


@pytest.mark.parametrize("method", ["mp", "vq", "refit", "jumprelu"])
def test_methods_that_cannot_transcode_refuse(method):
    with pytest.raises(SparsecodeError, match=f"method '{method}' cannot transcode"):
        build(method, dict(d_in=8, m=64, d_out=4))


def test_bad_transcoder_options_are_one_clear_error(tmp_path):
    with pytest.raises(SparsecodeError, match="skip needs a target"):
        build("topk", dict(d_in=8, m=16, k=2, skip=True))
    with pytest.raises(SparsecodeError, match="needs a source that gives a target"):
        Trainer(TrainConfig(coder=dict(d_out=4), source=SourceConfig(kind="synthetic"), steps=2), tmp_path / "r")
    with pytest.raises(SparsecodeError, match="target has d_out=32 but the run expects d_out=7"):
        Trainer(TrainConfig(coder=dict(d_out=7), source=SourceConfig(kind="sparse_map", options=MAP), steps=2),
                tmp_path / "r")


# --- a paired store of the tiny GPT-2's first MLP: its input and its output, one pass ----------------------
@pytest.fixture(scope="module")
def loud_gpt2(gpt2_dir, tmp_path_factory):  # noqa: F811
    """The tiny GPT-2 with its embedding (tied head) and first MLP scaled up: at init both are so small that the
    loss is ln(vocab) whatever the MLP writes, and zero-ablating it changes nothing."""
    folder = tmp_path_factory.mktemp("loud") / "gpt2"
    shutil.copytree(gpt2_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(50)
        model.transformer.h[0].mlp.c_fc.weight.mul_(10)
        model.transformer.h[0].mlp.c_proj.weight.mul_(50)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mlp_store(loud_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("paired")
    corpus = write_corpus(root / "c")
    harvest(HarvestConfig(out=str(root / "s"), model=str(loud_gpt2), hook="transformer.h.0.mlp", hook_point="input",
                          target="transformer.h.0.mlp", target_point="output", corpus=str(corpus), tokens=3000,
                          context=16, dtype="fp32", shard_tokens=700, batch_contexts=8, device="cpu"))
    return root / "s"


def test_paired_store_rows_are_aligned(mlp_store, loud_gpt2):
    store = Store(mlp_store)
    m = store.manifest
    assert m["target"] == "transformer.h.0.mlp" and m["target_point"] == "output" and m["d_out"] == store.d_out == 32
    model = AutoModelForCausalLM.from_pretrained(loud_gpt2).eval()
    mlp, pairs = model.transformer.h[0].mlp, []
    handle = mlp.register_forward_hook(lambda mod, args, out: pairs.append((args[0], out)))
    idx = torch.arange(store.n)
    x, y, tokens = store.gather(idx), store.gather(idx, "target"), store.gather(idx, "tokens")
    with torch.no_grad():  # each stored input row, run through the MLP alone, gives the stored target row
        torch.testing.assert_close(mlp(x), y, rtol=1e-5, atol=1e-5)
        first = tokens[: 15]  # the first context: BOS + 15 content tokens (no document ends in it)
        model(input_ids=torch.cat([torch.tensor([model.config.bos_token_id]), first])[None])
    handle.remove()
    torch.testing.assert_close(pairs[-1][0][0, 1:], x[:15], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pairs[-1][1][0, 1:], y[:15], rtol=1e-6, atol=1e-6)
    source = open_source(SourceConfig(kind="store", path=str(mlp_store)))
    batch = source.next_batch(64)  # the store source's rows: the input, then its own target beside it
    assert source.d == 32 and source.d_out == 32 and batch.shape == (64, 64)
    with torch.no_grad():
        torch.testing.assert_close(mlp(batch[:, :32]), batch[:, 32:], rtol=1e-5, atol=1e-5)


def test_transcoder_on_paired_store_splices_between_clean_and_ablated(mlp_store, loud_gpt2, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--source", str(mlp_store), "-m", "128", "-k", "16", "--steps", "300", "--batch-size",
                 "128", "--lr", "3e-3", "--device", "cpu", "--out", str(run), "--no-progress"]) == 0
    coder = load_coder(run)
    assert coder.cfg.d_out == 32
    result = splice_store(coder, str(mlp_store), contexts=16, device="cpu")
    assert result["loss_clean"] < result["loss_spliced"] < result["loss_zero"], result
    assert result["loss_recovered"] > 0.95, result  # 0.87 if it transcodes the MLP's output instead of its input
    # the spliced run is the forward hook that returns transcoder(MLP input) in place of the MLP's output
    model = AutoModelForCausalLM.from_pretrained(loud_gpt2).eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    got = spliced_loss(model, "transformer.h.0.mlp", transcode_with(coder), ids,
                       read=("transformer.h.0.mlp", "input"))["loss_spliced"]
    handle = model.transformer.h[0].mlp.register_forward_hook(
        lambda mod, args, out: coder.transcode(args[0].reshape(-1, 32)).reshape(out.shape))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    handle.remove()
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    assert abs(got - want) < 1e-4 * want


def test_cli_refuses_bad_transcoder_input(mlp_store, gpt2_dir, tmp_path, capsys):  # noqa: F811
    corpus = write_corpus(tmp_path / "c")
    assert main(["harvest", "--model", str(gpt2_dir), "--hook", "transformer.h.0.mlp", "--target", "transformer.h.9",
                 "--corpus", str(corpus), "--tokens", "100", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert "no module 'transformer.h.9'" in capsys.readouterr().err
    assert main(["train", "--source", str(mlp_store), "--set", "d_out=7", "--steps", "2", "--out",
                 str(tmp_path / "r1"), "--no-progress"]) == 2
    assert "target has d_out=32 but the run expects d_out=7" in capsys.readouterr().err
    assert main(["train", "--method", "mp", "--source", str(mlp_store), "--steps", "2", "--out",
                 str(tmp_path / "r2"), "--no-progress"]) == 2
    assert "method 'mp' cannot transcode" in capsys.readouterr().err
