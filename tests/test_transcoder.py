"""Transcoders: codes of one site decoded to another (synthetic maps recovered, skip path, paired harvest, splice)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_helpers import gpt2_dir, write_corpus  # noqa: F401
from sae_helpers import assert_resumes_exactly
from transformers import AutoModelForCausalLM

from sparsecode.checkpoint import load_coder
from sparsecode.cli import main
from sparsecode.coder import build
from sparsecode.data.harvest import HarvestConfig, harvest
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.data.store import Store
from sparsecode.errors import SparsecodeError
from sparsecode.evaluate import evaluate
from sparsecode.metrics import fvu
from sparsecode.splice import splice_store, spliced_loss, transcode_with
from sparsecode.train import TrainConfig, Trainer, load_config, train

MAP = dict(d=48, d_out=32, n_features=48, active=3.0, alpha=0.0)  # y = A·f, x = B·f, 3 features a row
DENSE = dict(MAP, input_noise=0.1, dense=1.0)  # y = A·f + C·x, x with a dense part f does not explain


def fit(tmp_path, name, options, coder, steps=600, method="topk"):
    cfg = TrainConfig(method=method, coder=coder, source=SourceConfig(kind="sparse_map", options=options),
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
    assert_resumes_exactly(cfg, tmp_path, stop=6)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["coder"]["d_out"] == 32


def test_jumprelu_transcoder_recovers_a_sparse_map(tmp_path):
    coder, x, y, _ = fit(tmp_path, "jumprelu", MAP, dict(m=64, l0_coef=0.01), method="jumprelu")
    with torch.no_grad():
        assert coder.W_dec.shape == (64, 32) and coder.cfg.d_out == 32
        assert fvu(y, coder.transcode(x)).item() < 0.2  # measured 0.089 at L0 2.4
        assert coder.encode(x).l0().float().mean() < 8


@pytest.mark.parametrize("method", ["mp", "vq", "refit", "itda"])
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


# --- eval, report, diagnose and info of a transcoder run: the target's FVU from the code of the input --------
@pytest.fixture(scope="module")
def map_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tc") / "run"
    train(TrainConfig(method="topk", coder=dict(m=64, k=6, skip=True), steps=150, batch_size=256, lr=5e-3,
                      source=SourceConfig(kind="sparse_map", options=dict(MAP, dense=0.5)), device="cpu"), run)
    return run


def test_eval_of_a_transcoder_is_the_fvu_of_its_target(map_run, capsys):
    assert main(["eval", str(map_run), "--rows", "3000", "--batch-size", "1000"]) == 0
    assert capsys.readouterr().out.startswith("fvu of the target")
    result = json.loads((map_run / "eval.json").read_text())
    held = open_source(load_config(map_run).source, "eval")  # the same held-out rows, in the same batches
    rows = torch.cat([held.next_batch(1000) for _ in range(3)])
    x, y = rows[:, :48], rows[:, 48:]
    coder = load_coder(map_run).eval()
    with torch.no_grad():
        want = fvu(y.double(), coder.transcode(x).double()).item()
        l0 = coder.encode(x).l0().double().mean().item()
    assert result["fvu_of"] == "target" and result["rows"] == 3000
    assert result["fvu"] == pytest.approx(want, rel=1e-5) and result["l0"] == pytest.approx(l0, rel=1e-9)
    assert 0 < result["fvu"] < 0.5  # the skip path is part of the output (without it: 0.7)


def test_report_diagnose_and_info_read_a_transcoder_run(map_run, capsys):
    assert main(["diagnose", str(map_run), "--rows", "1024"]) == 0
    assert main(["report", str(map_run)]) == 0
    assert "fvu of</th><td>the target" in (map_run / "report" / "index.html").read_text()
    assert main(["info", str(map_run)]) == 0
    assert "transcoder with a skip path: input d_in=48, target d_out=32" in capsys.readouterr().out


def test_transcoder_eval_refuses_data_without_a_target(map_run, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((64, 48), np.float32))
    assert main(["eval", str(map_run), "--data", str(tmp_path / "x.npy")]) == 2
    assert "the run is a transcoder (d_out=32) but the data gives no target" in capsys.readouterr().err


# --- a transcoder of the MLP's input to its wider hidden layer (d_in 32 → d_out 128) on a paired store ---------
@pytest.fixture(scope="module")
def fc_run(loud_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    corpus = write_corpus(root / "c")
    for name, target in (("paired", "transformer.h.0.mlp.c_fc"), ("plain", "")):
        harvest(HarvestConfig(out=str(root / name), model=str(loud_gpt2), hook="transformer.h.0.mlp",
                              hook_point="input", target=target, corpus=str(corpus), tokens=1200, context=16,
                              dtype="fp32", shard_tokens=600, batch_contexts=8, device="cpu"))
    assert main(["train", "--method", "relu", "--source", str(root / "paired"), "-m", "64", "--steps", "40",
                 "--batch-size", "128", "--lr", "3e-3", "--device", "cpu", "--out", str(root / "run"),
                 "--no-progress"]) == 0
    return root


def test_store_transcoder_evaluates_builds_features_and_refuses_an_unpaired_store(fc_run, capsys):
    run = fc_run / "run"
    assert load_coder(run).cfg.d_out == 128
    assert main(["eval", str(run), "--splice-contexts", "2"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["fvu_of"] == "target" and 0 < result["fvu"] < 1 and "loss_spliced" in result["spliced"]
    assert main(["features", str(run), "--top", "4"]) == 0  # the code of the input: the store's acts, d = 32
    assert (run / "features.sqlite").is_file()
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(fc_run / "plain")]) == 2
    err = capsys.readouterr().err
    assert "the run is a transcoder (d_out=128) but the data gives no target" in err and len(err.splitlines()) == 1


def test_transcoder_exported_and_imported_evaluates_alike(fc_run, tmp_path, capsys):
    run, store = fc_run / "run", str(fc_run / "paired")
    assert main(["export", str(run), "--to", "saelens", "--out", str(tmp_path / "tc")]) == 0
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder" and cfg["d_out"] == 128 and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name_out"] == "transformer.h.0.mlp.c_fc"  # from the paired store's manifest
    assert main(["import", str(tmp_path / "tc"), "--out", str(tmp_path / "back")]) == 0
    assert "imported as a relu transcoder" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "back")]) == 2  # an imported run has no held-out split: it says what to give
    assert "evaluate it with --data PAIRED_STORE" in capsys.readouterr().err
    figures = []
    for r in (run, tmp_path / "back"):
        capsys.readouterr()
        assert main(["eval", str(r), "--data", store, "--splice-contexts", "0", "--json"]) == 0
        figures.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert figures[0]["fvu"] == figures[1]["fvu"] and figures[0]["l0"] == figures[1]["l0"]


@pytest.mark.parametrize("dense", [0.0, 1.0])
def test_a_transcoders_start_is_read_from_its_init_rows(tmp_path, dense):
    """Before any step, b_enc spreads the latents (each fires on a k/m share of the init rows) and each atom is the
    mean target of its rows: the start already explains part of the target (FVU 0.86 measured; random atoms: 1.3-1.5)
    and every latent fires on held-out rows."""
    src = SourceConfig(kind="sparse_map", options=dict(MAP, dense=dense, input_noise=0.1 * dense))
    cfg = TrainConfig(method="topk", coder=dict(m=256, k=4), source=src, steps=10, batch_size=512, init_rows=4096,
                      device="cpu")
    trainer = Trainer(cfg, tmp_path / "r", progress=False)
    trainer.start()
    r = evaluate(trainer.coder, open_source(src, "eval"), rows=4096, details=False)
    assert r["fvu"] < 0.95 and r["never_fired"] < 0.01, r
