"""Export and import without the other libraries: our writer and reader against each other and against the
format's own forward, round trips bit for bit, and every bad file refused in one line with nothing written.
The libraries themselves check these files in tests/test_interop_libs.py (`make test-interop`)."""

import json
import shutil

import numpy as np
import pytest
import torch
from data_helpers import minilm_store  # noqa: F401
from interop_helpers import PAIRS, TC_PAIRS, TRANSCODERS, make_runs, make_transcoders
from safetensors.torch import load_file, save_file

from sparsecode.checkpoint import load_coder as load_run
from sparsecode.cli import main
from sparsecode.coder import build
from sparsecode.errors import SparsecodeError
from sparsecode.evaluate import evaluate
from sparsecode.interop import export_run, import_folder, load_coder, probe_rows, read_foreign, self_check
from sparsecode.interop.foreign import build_coder
from sparsecode.interop.saelens import held_threshold


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("interop"))


def weights(coder) -> dict[str, torch.Tensor]:
    """The tensors that define a coder's encode/decode (not its training bookkeeping)."""
    keep = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "theta", "W_skip"}
    return {k: v for k, v in coder.state_dict().items() if k in keep}


@pytest.mark.parametrize("fmt, method", PAIRS)
def test_round_trip_is_bit_identical(runs, tmp_path, fmt, method):
    """sparsecode → files → sparsecode gives the same tensors bit for bit, and the written files' own forward
    matches the run on its held-out rows."""
    out = tmp_path / "out"
    r = export_run(runs[method], fmt, out)
    assert r["data"] == "held-out" and r["l0"] > 0.5 and r["reconstructions"] <= 1e-5
    back = import_folder(out, tmp_path / "back")
    assert back["method"] == method
    a, b = load_run(runs[method]), load_run(tmp_path / "back")
    origin = json.loads((tmp_path / "back" / "origin.json").read_text())
    assert origin["format"] == fmt and origin["self_check"]["rows"] == 512
    if (fmt, method) == ("dictionary_learning", "relu"):  # its loader keeps unit atoms: the norms are folded
        n = a.W_dec.norm(dim=1)
        torch.testing.assert_close(b.W_dec, a.W_dec / n[:, None])
        torch.testing.assert_close(b.b_enc, a.b_enc * n)
    elif (fmt, method) == ("dictionary_learning", "jumprelu"):  # it encodes x itself: b_enc holds the fold
        assert b.cfg.center_input is False
        x = torch.from_numpy(np.load(runs[method].parent / "x.npy")[:512])
        torch.testing.assert_close(b.encode(x).to_dense(), a.encode(x).to_dense(), rtol=1e-5, atol=1e-5)
        for k in ("W_enc", "W_dec", "b_dec", "theta"):
            assert torch.equal(weights(a)[k], weights(b)[k]), k
    else:
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


def test_unknown_pairs_are_refused_with_what_the_target_holds(runs, tmp_path, capsys):
    assert main(["export", str(runs["relu"]), "--to", "sparsify", "--out", str(tmp_path / "o")]) == 2
    assert "sparsify has no equivalent of relu: it holds topk" in capsys.readouterr().err
    assert main(["export", str(runs["mp"]), "--to", "dictionary_learning", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*"))


def test_export_refuses_a_used_folder_and_keeps_it(runs, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep")
    assert main(["export", str(runs["topk"]), "--to", "saelens", "--out", str(tmp_path / "o")]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["mine.txt"]


@pytest.fixture
def saelens_topk(runs, tmp_path):
    out = tmp_path / "sae"
    export_run(runs["topk"], "saelens", out)
    return out


def _rewrite(folder, fn):
    t = load_file(folder / "sae_weights.safetensors")
    fn(t)
    save_file(t, folder / "sae_weights.safetensors")


@pytest.mark.parametrize("damage, message", [
    (lambda f: _rewrite(f, lambda t: t.update(W_dec=t["W_dec"].T.contiguous())), "W_dec has shape [16, 64], the "
     "config says [64, 16] (transposed?)"),
    (lambda f: (f / "cfg.json").write_text(json.dumps({**json.loads((f / "cfg.json").read_text()), "d_sae": 32})),
     "has shape [64, 16], the config says [32, 16]"),
    (lambda f: (f / "sae_weights.safetensors").write_bytes((f / "sae_weights.safetensors").read_bytes()[:1000]),
     "cannot read"),
    (lambda f: (f / "cfg.json").write_text(json.dumps({**json.loads((f / "cfg.json").read_text()),
                                                       "architecture": "gated"})),
     "architecture 'gated' has no sparsecode method"),
    (lambda f: _rewrite(f, lambda t: t.pop("b_enc")), "no tensor 'b_enc'"),
    (lambda f: _rewrite(f, lambda t: t["W_enc"].__setitem__((0, 0), float("nan"))), "NaN"),
    (lambda f: (f / "cfg.json").write_text("{not json"), "cfg.json"),
])
def test_bad_saelens_files_are_one_line_and_leave_no_run(saelens_topk, tmp_path, capsys, damage, message):
    damage(saelens_topk)
    assert main(["import", str(saelens_topk), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_threshold_missing_or_wrong_is_refused(runs, tmp_path):
    out = tmp_path / "jr"
    export_run(runs["jumprelu"], "saelens", out)
    _rewrite(out, lambda t: t.pop("threshold"))
    with pytest.raises(SparsecodeError, match="no tensor 'threshold'"):
        import_folder(out, tmp_path / "run")
    # tensors that do not compute what the file's format says are caught by the self-check, not loaded
    export_run(runs["topk"], "saelens", tmp_path / "tk")
    f = read_foreign(tmp_path / "tk")
    f.state["b_enc"] = f.state["b_enc"] + 1.0  # a mapping mistake: our tensors no longer match the file
    with pytest.raises(SparsecodeError, match="self-check failed"):
        self_check(build_coder(f), f.reference, probe_rows(build_coder(f)))


def test_release_folder_needs_a_choice(runs, tmp_path, capsys):
    release = tmp_path / "release"
    release.mkdir()
    for name in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        export_run(runs["topk"], "saelens", release / name)
    assert main(["import", str(release), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "holds 2 SAEs; pick one with --sae: blocks.0.hook_resid_post, blocks.1.hook_resid_post" in err
    assert main(["import", str(release), "--sae", "blocks.1.hook_resid_post", "--out", str(tmp_path / "run")]) == 0
    assert "imported as topk" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "origin.json").read_text())["sae"] == "blocks.1.hook_resid_post"
    coder = load_coder(release, sae="blocks.0.hook_resid_post")
    assert coder.name == "topk" and coder.cfg.k == 4


def test_imported_run_evaluates_like_the_files_forward(runs, tmp_path, capsys):
    """`eval --data` on an imported sparsify SAE gives the FVU and L0 of the format's own forward."""
    export_run(runs["topk"], "sparsify", tmp_path / "sp")
    assert main(["import", str(tmp_path / "sp"), "--out", str(tmp_path / "run")]) == 0
    data = runs["topk"].parent / "x.npy"
    assert main(["eval", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    x = torch.from_numpy(np.load(data))
    z, x_hat = read_foreign(tmp_path / "sp").reference(x)
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert result["fvu"] == pytest.approx(fvu, abs=1e-4) and result["l0"] == pytest.approx(float((z != 0).sum(1)
                                                                                                  .float().mean()))
    assert main(["info", str(tmp_path / "run")]) == 0
    assert main(["report", str(tmp_path / "run"), "--data", str(data)]) == 0
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "<h2>imported</h2>" in page and "sparsify" in page and "held-out evaluation" in page


def test_a_files_threshold_is_held_bit_for_bit_and_negative_ones_are_refused():
    """θ is trained directly, so an imported θ needs no log round trip (any fp32 value stays); a negative θ has no
    sparsecode reading; a log-θ jumprelu reads the same file as log θ."""
    theta = torch.linspace(-9, 6, 2001).exp()
    sae = build("jumprelu", {"d_in": 4, "m": 2001})
    sae.load_state_dict({**sae.state_dict(), "theta": held_threshold(theta, "t")})
    assert torch.equal(sae.theta, theta)
    old = build("jumprelu", {"d_in": 4, "m": 2001, "theta_param": "log"})
    old.load_state_dict({k: v for k, v in sae.state_dict().items()}, strict=False)
    assert torch.equal(old.theta, theta) and torch.allclose(old.log_theta.exp(), theta)
    with pytest.raises(SparsecodeError, match="values < 0"):
        held_threshold(torch.tensor([0.1, -1e-8]), "t")


def test_real_activations_round_trip(minilm_store, tmp_path):  # noqa: F811
    """A JumpReLU trained on MiniLM rows (outlier dimensions, wide norms) survives SAELens's layout exactly, the
    check runs on the store's held-out rows, and the firing densities are written."""
    from sparsecode.data.source import SourceConfig, open_source
    from sparsecode.train import TrainConfig, train

    src = SourceConfig(kind="store", path=str(minilm_store), heldout=0.1)
    train(TrainConfig(method="jumprelu", coder={"m": 512}, source=src, steps=30, batch_size=512, lr=3e-3),
          tmp_path / "run")
    r = export_run(tmp_path / "run", "saelens", tmp_path / "sae")
    assert r["data"] == "held-out" and r["rows"] == 512
    sparsity = load_file(tmp_path / "sae" / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (512,) and bool((sparsity <= 0).all())
    import_folder(tmp_path / "sae", tmp_path / "back")
    a, b = load_run(tmp_path / "run"), load_run(tmp_path / "back")
    assert all(torch.equal(weights(a)[k], weights(b)[k]) for k in weights(a))
    ours, back = (evaluate(c, open_source(src, "eval"), rows=2048, details=False) for c in (a, b))
    assert back["fvu"] == ours["fvu"] and back["l0"] == ours["l0"] > 1


def test_hub_ids_resolve_through_the_local_cache(saelens_topk, tmp_path, monkeypatch, capsys):
    """`org/name` goes through huggingface_hub: a snapshot in its cache is found offline; an uncached id offline
    is one line."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny-sae" / "snapshots" / ("a" * 40)
    shutil.copytree(saelens_topk, snap)
    (cache / "models--org--tiny-sae" / "refs").mkdir()
    (cache / "models--org--tiny-sae" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert main(["import", "org/tiny-sae", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "origin.json").read_text())["source"] == "org/tiny-sae"
    capsys.readouterr()
    assert main(["import", "org/absent", "--out", str(tmp_path / "run2")]) == 2
    assert "org/absent is no local folder and could not be fetched" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


# --- transcoders -------------------------------------------------------------------------------------------
ARCHITECTURES = {"relu_tc": "transcoder", "relu_skip": "skip_transcoder", "jumprelu_tc": "jumprelu_transcoder",
                 "jumprelu_skip": "jumprelu_skip_transcoder", "batchtopk_skip": "jumprelu_skip_transcoder",
                 "topk_tc": "transcoder", "topk_skip": "transcoder"}


@pytest.fixture(scope="module")
def transcoders(tmp_path_factory):
    return make_transcoders(tmp_path_factory.mktemp("tc"))


@pytest.mark.parametrize("fmt, name", TC_PAIRS)
def test_transcoder_round_trip_is_bit_identical(transcoders, tmp_path, fmt, name):
    """A transcoder → files → sparsecode: the same tensors (W_skip too), checked on held-out inputs against the
    files' forward to the target's width."""
    method, _, d_out, skip = TRANSCODERS[name]
    r = export_run(transcoders[name], fmt, tmp_path / "out")
    assert r["data"] == "held-out" and r["l0"] > 0.5 and r["reconstructions"] <= 1e-5
    back = import_folder(tmp_path / "out", tmp_path / "back")
    a, b = load_run(transcoders[name]), load_run(tmp_path / "back")
    assert back["method"] == b.name == method and (b.cfg.d_out, b.cfg.skip) == (d_out, skip)
    origin = json.loads((tmp_path / "back" / "origin.json").read_text())
    assert origin["architecture"] == ARCHITECTURES[name]
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and ("W_skip" in wa) == skip
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    if skip:
        assert wa["W_skip"].abs().sum() > 0  # trained away from its zero start: the check covers the path


def test_transcoders_a_format_cannot_hold_are_refused(transcoders, tmp_path, capsys):
    for run, to, message in [
            ("relu_tc", "dictionary_learning", "dictionary_learning has no transcoder like relu: it holds no "
                                               "transcoders"),
            ("topk_tc", "saelens", "saelens has no transcoder like topk: it holds relu, jumprelu, batchtopk, "
                                   "matryoshka transcoders"),
            ("relu_tc", "sparsify", "sparsify has no transcoder like relu: it holds topk transcoders"),
            ("jumprelu_tc", "sparsify", "sparsify has no transcoder like jumprelu")]:
        assert main(["export", str(transcoders[run]), "--to", to, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".*"))


def _edit_cfg(path, fn):
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_a_transcoder_file_that_contradicts_itself_is_refused(transcoders, tmp_path, capsys):
    export_run(transcoders["relu_skip"], "saelens", tmp_path / "s")
    _edit_cfg(tmp_path / "s" / "cfg.json", lambda c: c.update(d_out=11))
    assert main(["import", str(tmp_path / "s"), "--out", str(tmp_path / "r")]) == 2
    assert "W_dec has shape [64, 12], the config says [64, 11]" in capsys.readouterr().err
    _edit_cfg(tmp_path / "s" / "cfg.json", lambda c: c.update(d_out=12, apply_b_dec_to_input=True))
    assert main(["import", str(tmp_path / "s"), "--out", str(tmp_path / "r")]) == 2
    assert "skip_transcoder with apply_b_dec_to_input=true" in capsys.readouterr().err
    export_run(transcoders["topk_skip"], "sparsify", tmp_path / "p")
    layer = next(p for p in (tmp_path / "p").iterdir() if p.is_dir())
    _edit_cfg(layer / "cfg.json", lambda c: c.update(transcode=False))
    assert main(["import", str(tmp_path / "p"), "--out", str(tmp_path / "r")]) == 2
    assert "skip_connection=true with transcode=false" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
