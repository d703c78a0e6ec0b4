"""The real libraries read our files and we read theirs (`make test-interop`, in .venv-interop where SAELens,
sparsify and dictionary_learning are installed from PyPI; skipped elsewhere). For each method and library:
(a) its own loader reads our export and its encode/decode of 1,000 rows matches ours, (b) a coder it saved is
imported with the same match, (c) sparsecode → library (load, save) → sparsecode is bit for bit, and (d)
`sparsecode eval` of an imported SAELens or sparsify SAE gives the FVU and L0 of the library's forward."""

import json
import shutil

import numpy as np
import pytest
import torch
from interop_helpers import HOLDS, PAIRS, TC_PAIRS, TRANSCODERS, D, M, activations, make_runs, make_transcoders

from sparsecode.checkpoint import load_coder as load_run
from sparsecode.cli import main
from sparsecode.data.source import open_source
from sparsecode.interop import export_run, import_folder
from sparsecode.train import load_config

pytestmark = pytest.mark.interop
sae_lens = pytest.importorskip("sae_lens", reason="SAELens is installed in .venv-interop (make test-interop)")
sparsify = pytest.importorskip("sparsify", reason="sparsify is installed in .venv-interop (make test-interop)")
dl_utils = pytest.importorskip("dictionary_learning.utils",
                               reason="dictionary_learning is installed in .venv-interop (make test-interop)")

TOL = 1e-5
ROWS = torch.from_numpy(activations(1000, seed=1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("libs"))


# --- each library's own loader, encode and decode ------------------------------------------------------------
def their_load(fmt: str, folder):
    if fmt == "saelens":
        return sae_lens.SAE.load_from_disk(folder)
    if fmt == "sparsify":
        return sparsify.SparseCoder.load_from_disk(next(p for p in folder.iterdir() if p.is_dir()))
    return dl_utils.load_dictionary(str(folder), device="cpu")[0]


@torch.no_grad()
def their_forward(fmt: str, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if fmt == "sparsify":
        acts, idx, _ = model.encode(x)
        return torch.zeros(x.shape[0], model.num_latents).scatter_(1, idx, acts), model.decode(acts, idx)
    z = model.encode(x)
    return z, model.decode(z)


def their_save(fmt: str, model, src, folder) -> None:
    """The library's own way of saving the coder it loaded (dictionary_learning's trainers torch.save the state
    dict next to their config.json)."""
    if fmt == "saelens":
        model.save_model(folder)
    elif fmt == "sparsify":
        model.save_to_disk(folder / next(p for p in src.iterdir() if p.is_dir()).name)
    else:
        folder.mkdir()
        torch.save(model.state_dict(), folder / "ae.pt")
        shutil.copy(src / "config.json", folder / "config.json")


@torch.no_grad()
def ours_forward(coder, x):
    code = coder.eval().encode(x)
    return code.to_dense(), coder.decode(code)


def assert_match(ours, theirs, scale=None):
    (z, x_hat), (tz, tx) = ours, theirs
    assert torch.equal(z != 0, tz != 0), f"{int(((z != 0) != (tz != 0)).sum())} activations differ in being active"
    z = z * scale if scale is not None else z
    assert float((z - tz).abs().max() / tz.abs().max()) <= TOL
    assert float((x_hat - tx).abs().max() / tx.abs().max()) <= TOL
    assert float((z != 0).sum(1).float().mean()) > 0.5  # the rows fire latents: the check means something


# --- (a) they read ours --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, method", PAIRS)
def test_library_reads_our_export(runs, tmp_path, fmt, method):
    export_run(runs[method], fmt, tmp_path / "out")
    coder = load_run(runs[method])
    scale = coder.W_dec.detach().norm(dim=1) if (fmt, method) == ("dictionary_learning", "relu") else None
    assert_match(ours_forward(coder, ROWS), their_forward(fmt, their_load(fmt, tmp_path / "out"), ROWS), scale)


# --- (c) sparsecode → library → sparsecode ------------------------------------------------------------------
def weights(coder) -> dict[str, torch.Tensor]:
    keep = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "theta"}
    return {k: v for k, v in coder.state_dict().items() if k in keep}


@pytest.mark.parametrize("fmt, method", PAIRS)
def test_round_trip_through_the_library_is_bit_identical(runs, tmp_path, fmt, method):
    export_run(runs[method], fmt, tmp_path / "out")
    their_save(fmt, their_load(fmt, tmp_path / "out"), tmp_path / "out", tmp_path / "theirs")
    import_folder(tmp_path / "theirs", tmp_path / "back")
    a, b = load_run(runs[method]), load_run(tmp_path / "back")
    wa, wb = weights(a), weights(b)
    exact = set(wa)
    if (fmt, method) == ("dictionary_learning", "relu"):  # its loader makes atoms unit-norm
        exact = {"b_dec"}
    if (fmt, method) == ("dictionary_learning", "jumprelu"):  # it encodes x itself: b_enc holds the fold
        exact -= {"b_enc"}
    if fmt == "saelens" and method in ("batchtopk", "matryoshka"):  # SAELens holds them as JumpReLUs, and its
        wa["theta"] = wa.pop("threshold").expand(M).contiguous()  # saver drops the metadata that named them
        exact, method = set(wa), "jumprelu"
    assert b.name == method
    for k in exact:
        assert torch.equal(wa[k], wb[k]), k
    assert_match(ours_forward(b, ROWS), their_forward(fmt, their_load(fmt, tmp_path / "theirs"), ROWS))


# --- (b) we read theirs --------------------------------------------------------------------------------------
def randomise(model, g, positive=("threshold",)):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
            if name in positive:
                p.copy_(p.abs() + 0.05)


def saelens_model(method: str, g):
    from sae_lens.saes import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        MatchingPursuitSAE,
        MatchingPursuitSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    make = {"topk": lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=4)),
            "relu": lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=M)),
            "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=M, apply_b_dec_to_input=False)),
            "batchtopk": lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=4)),
            "mp": lambda: MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=D, d_sae=M, max_iterations=4,
                                                                      residual_threshold=0.0,
                                                                      stop_on_duplicate_support=False))}
    model = make[method]()
    randomise(model, g)
    if method == "mp":
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)
    if method == "batchtopk":
        model.topk_threshold.fill_(0.2)
    return model


def dl_model(method: str, g):
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    make = {"topk": lambda: AutoEncoderTopK(D, M, 4), "batchtopk": lambda: BatchTopKSAE(D, M, 4),
            "matryoshka": lambda: MatryoshkaBatchTopKSAE(D, M, 4, [8, 24, 32]),
            "jumprelu": lambda: JumpReluAutoEncoder(D, M), "relu": lambda: AutoEncoder(D, M)}
    model = make[method]()
    randomise(model, g)
    if method in ("batchtopk", "matryoshka"):
        model.threshold.fill_(0.2)
    return model


THEIRS = [("saelens", m) for m in ("topk", "relu", "jumprelu", "batchtopk", "mp")] + [("sparsify", "topk")] + \
    [("dictionary_learning", m) for m in HOLDS["dictionary_learning"]]
IMPORTED_AS = {("saelens", "batchtopk"): "jumprelu"}  # SAELens saves its BatchTopK as a JumpReLU


@pytest.mark.parametrize("fmt, method", THEIRS)
def test_we_read_what_the_library_saved(tmp_path, fmt, method):
    g = torch.Generator().manual_seed(hash((fmt, method)) % 2**31)
    folder = tmp_path / "theirs"
    if fmt == "saelens":
        model = saelens_model(method, g)
        (model.save_inference_model if method == "batchtopk" else model.save_model)(folder)
    elif fmt == "sparsify":
        model = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=M, k=4))
        randomise(model, g)
        model.save_to_disk(folder / "layers.3")
    else:
        model = dl_model(method, g)
        folder.mkdir()
        torch.save(model.state_dict(), folder / "ae.pt")
        trainer = {"dict_class": type(model).__name__, "activation_dim": D, "dict_size": M, "k": 4}
        (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    r = import_folder(folder, tmp_path / "run")
    assert r["method"] == IMPORTED_AS.get((fmt, method), method)
    x = ROWS * 0.3  # the random coders' scale
    assert_match(ours_forward(load_run(tmp_path / "run"), x), their_forward(fmt, their_load(fmt, folder), x))


# --- (d) eval of an imported SAE is the library's forward ----------------------------------------------------
@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_eval_of_an_imported_sae_matches_the_library(runs, tmp_path, capsys, fmt):
    export_run(runs["topk"], fmt, tmp_path / "out")
    assert main(["import", str(tmp_path / "out"), "--out", str(tmp_path / "run")]) == 0
    data = runs["topk"].parent / "x.npy"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(data), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    x = torch.from_numpy(np.load(data))
    z, x_hat = their_forward(fmt, their_load(fmt, tmp_path / "out"), x)
    fvu = float(((x - x_hat).double() ** 2).sum() / ((x - x.mean(0)).double() ** 2).sum())
    assert ours["fvu"] == pytest.approx(fvu, abs=1e-4)
    assert ours["l0"] == pytest.approx(float((z != 0).sum(1).double().mean()), abs=1e-4)


# --- (e) transcoders: their loaders read ours, we read theirs ------------------------------------------------
@pytest.fixture(scope="module")
def transcoders(tmp_path_factory):
    return make_transcoders(tmp_path_factory.mktemp("tc"))


@torch.no_grad()
def their_transcode(fmt: str, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations, output) of a library's transcoder: SAELens's forward (decode(encode(x)), + x·W_skipᵀ for
    the skip forms); sparsify's forward (its decode plus its skip path), whose target we pass as x."""
    if fmt == "sparsify":
        acts, idx, _ = model.encode(x)
        return torch.zeros(x.shape[0], model.num_latents).scatter_(1, idx, acts), model(x, x).sae_out
    return model.encode(x), model(x)


@torch.no_grad()
def ours_transcode(coder, x):
    return coder.eval().encode(x).to_dense(), coder.transcode(x)


@pytest.mark.parametrize("fmt, name", TC_PAIRS)
def test_library_reads_our_transcoder_export(transcoders, tmp_path, fmt, name):
    """Their loader reads our transcoder export with the same activations and output on 1,000 held-out inputs;
    saved again by the library, it comes back bit for bit."""
    run = transcoders[name]
    export_run(run, fmt, tmp_path / "out")
    x = open_source(load_config(run).source, "eval").next_batch(1000)[:, :D]
    model = their_load(fmt, tmp_path / "out")
    if fmt == "saelens":
        assert type(model).__name__.endswith("Transcoder") and model.cfg.d_out == TRANSCODERS[name][2]
    else:
        assert model.cfg.transcode and (model.W_skip is not None) == TRANSCODERS[name][3]
    assert_match(ours_transcode(load_run(run), x), their_transcode(fmt, model, x))
    their_save(fmt, model, tmp_path / "out", tmp_path / "theirs")
    import_folder(tmp_path / "theirs", tmp_path / "back")
    a, b = load_run(run).state_dict(), load_run(tmp_path / "back").state_dict()
    if "threshold" in a:  # SAELens's saver drops the metadata naming a BatchTopK: a JumpReLU, its θ in every slot
        a["theta"] = a["threshold"].expand(M)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "theta"):
        assert (k in a) == (k in b) and (k not in a or torch.equal(a[k], b[k])), k


def saelens_transcoder(arch: str, g):
    from sae_lens.saes.transcoder import (
        JumpReLUSkipTranscoder,
        JumpReLUSkipTranscoderConfig,
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )
    make = {"transcoder": (Transcoder, TranscoderConfig), "skip_transcoder": (SkipTranscoder, SkipTranscoderConfig),
            "jumprelu_transcoder": (JumpReLUTranscoder, JumpReLUTranscoderConfig),
            "jumprelu_skip_transcoder": (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)}
    cls, cfg = make[arch]
    model = cls(cfg(d_in=D, d_sae=M, d_out=12, apply_b_dec_to_input=False))
    randomise(model, g)
    return model


THEIR_TRANSCODERS = [("saelens", a) for a in ("transcoder", "skip_transcoder", "jumprelu_transcoder",
                                               "jumprelu_skip_transcoder")] + [("sparsify", "transcoder"),
                                                                               ("sparsify", "skip_transcoder")]


@pytest.mark.parametrize("fmt, arch", THEIR_TRANSCODERS)
def test_we_read_transcoders_the_library_saved(tmp_path, fmt, arch):
    g = torch.Generator().manual_seed(sum(map(ord, fmt + arch)))
    folder = tmp_path / "theirs"
    if fmt == "saelens":
        model = saelens_transcoder(arch, g)
        model.save_model(folder)
    else:
        cfg = sparsify.SparseCoderConfig(num_latents=M, k=4, transcode=True, skip_connection=arch.startswith("skip"))
        model = sparsify.SparseCoder(D, cfg)
        randomise(model, g)
        model.save_to_disk(folder / "layers.3.mlp")
    r = import_folder(folder, tmp_path / "run")
    coder = load_run(tmp_path / "run")
    assert r["method"] == ("jumprelu" if "jumprelu" in arch else "relu" if fmt == "saelens" else "topk")
    assert coder.cfg.skip == ("skip" in arch) and coder.cfg.d_out == (12 if fmt == "saelens" else D)
    x = ROWS * 0.3  # the random coders' scale
    assert_match(ours_transcode(coder, x), their_transcode(fmt, their_load(fmt, folder), x))
