import json
import re
import subprocess
import sys

import numpy as np
import pytest

from sparsecode.cli import main


def cli(*args, capsys):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--method", "vq", "--source", "clusters", "--source-opt", "d=16",
                 "--source-opt", "n_clusters=32", "-m", "32", "--steps", "40", "--batch-size", "256",
                 "--out", str(run), "--no-progress"]) == 0
    return run


def test_train_eval_info_methods(trained, capsys):
    code, out, _ = cli("eval", str(trained), "--rows", "2048", "--json", capsys=capsys)
    assert code == 0
    result = json.loads(out)
    assert result["utilisation"] > 0.9 and result["rows"] == 2048 and result["l0"] == 1.0
    code, out, _ = cli("info", str(trained), capsys=capsys)
    assert code == 0 and "method: vq" in out and "step-0000040" in out and "fvu=" in out
    code, out, _ = cli("methods", capsys=capsys)
    names = [ln.split()[0] for ln in out.splitlines()]
    assert code == 0 and names == sorted(names) and {"topk", "vq", "mp", "simvq", "fsq"} <= set(names)


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "nope", "--out", "{tmp}/r"], "unknown method 'nope'"),
    (["train", "-m", "16", "-k", "17", "--out", "{tmp}/r"], "k must be in 1..m=16, got k=17"),
    (["train", "--set", "aux_coef=-1", "--out", "{tmp}/r"], "aux_coef must be non-negative"),
    (["train", "--set", "bogus=1", "--out", "{tmp}/r"], "unknown option 'bogus'"),
    (["train", "--source", "{tmp}/missing.npy", "--out", "{tmp}/r"], "activation file not found"),
    (["train", "--source", "{tmp}/nan.npy", "--steps", "3", "--out", "{tmp}/r"], "contains NaN or inf"),
    (["train", "--steps", "0", "--out", "{tmp}/r"], "steps must be positive"),
    (["train", "--precision", "fp16", "--out", "{tmp}/r"], "precision must be auto, fp32 or bf16, got 'fp16'"),
    (["train", "--grad-norm", "often", "--out", "{tmp}/r"], "grad_norm must be clip or unit, got 'often'"),
    (["train", "--decay", "step", "--out", "{tmp}/r"], "decay must be cosine, linear or constant, got 'step'"),
    (["train", "--init-rows", "-5", "--out", "{tmp}/r"], "init_rows must be"),
    (["train", "--out", "{tmp}/r", "--resume"], "run directory not found"),
    (["eval", "{tmp}/nowhere"], "run directory not found"),
    (["eval", "{run}", "--data", "{tmp}/wide.npy"], "the data has d=5 but the run expects d_in=16"),
    (["info", "{tmp}/nowhere"], "run directory not found"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, trained, capsys, args, message):
    np.save(tmp_path / "wide.npy", np.ones((64, 5), dtype=np.float32))
    nan = np.ones((512, 64), dtype=np.float32)
    nan[:, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    args = [a.format(tmp=tmp_path, run=trained) for a in args]
    code, _, err = cli(*args, capsys=capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    if "train" in args and "--resume" not in args:
        assert not (tmp_path / "r").exists()  # nothing written for a rejected run


def test_corrupted_run_is_one_line(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    model = run / "checkpoints" / "step-0000040" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    code, _, err = cli("eval", str(run), capsys=capsys)
    assert code == 2 and "corrupt or truncated" in err and len(err.strip().splitlines()) == 1


def test_module_entry_point_exit_code():
    proc = subprocess.run([sys.executable, "-m", "sparsecode", "train", "--method", "nope", "--out", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_demo_end_to_end_on_minilm(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "demo"), "--stores", str(tmp_path / "stores"), "--tokens", "6000",
                 "--steps", "30", "-m", "256", "-k", "8", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"FVU \d\.\d{4}  L0 8\.0  dead \d+\.\d%", out), out
    assert "loss recovered" in out and (tmp_path / "demo" / "eval.json").is_file()


def test_every_registered_source_kind_is_selectable(tmp_path, capsys):
    """One list of source kinds: `hierarchical` (registered by its module) trains from the command line."""
    code, _, err = cli("train", "-m", "32", "-k", "4", "--source", "hierarchical", "--steps", "5",
                       "--batch-size", "64", "--no-progress", "--out", str(tmp_path / "h"), capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "h" / "config.json").read_text())["source"]["kind"] == "hierarchical"
    code, _, err = cli("train", "--source", "hierarchy", "--out", str(tmp_path / "x"), capsys=capsys)
    assert code == 2 and "hierarchical" in err and not (tmp_path / "x").exists()


def test_interrupting_a_harvest_says_how_to_resume_it(monkeypatch, capsys):
    import sparsecode.data.harvest as harvest_module

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(harvest_module, "harvest", interrupted)
    code, _, err = cli("harvest", "--out", "s", capsys=capsys)
    assert code == 130 and "run the same harvest command again" in err and "--resume" not in err
    monkeypatch.setattr(sys.modules["sparsecode.train"], "train", interrupted)
    code, _, err = cli("train", "--out", "r", capsys=capsys)
    assert code == 130 and "--resume" in err
