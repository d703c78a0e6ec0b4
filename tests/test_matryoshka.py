import pytest
import torch
from data_helpers import minilm_store  # noqa: F401
from sae_helpers import SUPERPOSITION, one_thread, run

from sparsecode.code import Code
from sparsecode.coder import build
from sparsecode.data.source import SourceConfig, open_source
from sparsecode.errors import SparsecodeError
from sparsecode.evaluate import evaluate
from sparsecode.metrics import fvu
from sparsecode.train import TrainConfig, train


def test_prefix_losses_are_the_fvu_of_each_prefix_alone():
    """fvu@s is the FVU of x̂ built from the selected latents below s only (dense reference), one per prefix."""
    sae = build("matryoshka", {"d_in": 16, "m": 64, "k": 8, "prefixes": "1/8,1/2,1"})
    assert sae.sizes == [8, 32, 64]
    sae.train()
    x = torch.randn(32, 16)
    out = sae(x)
    assert set(out.losses) == {"fvu", "fvu@8", "fvu@32"}
    dense = out.code.to_dense().detach()
    for size in (8, 32, 64):
        x_hat = dense[:, :size] @ sae.W_dec.detach()[:size] + sae.b_dec.detach()
        loss = out.losses["fvu" if size == 64 else f"fvu@{size}"]
        torch.testing.assert_close(loss.detach(), fvu(x, x_hat), rtol=1e-5, atol=1e-6)
    assert (dense[:, 8:32] != 0).any() and (dense[:, 32:] != 0).any()  # every band holds latents: distinct losses


@pytest.mark.parametrize("bad", ["1/2", "0,1", "a,1", "1/0,1"])
def test_bad_prefixes_are_refused(bad):
    with pytest.raises(SparsecodeError, match="prefixes"):
        build("matryoshka", {"d_in": 16, "m": 64, "k": 4, "prefixes": bad})


def test_bad_selection_is_refused():
    with pytest.raises(SparsecodeError, match="selection"):
        build("matryoshka", {"d_in": 16, "m": 64, "k": 4, "selection": "top"})


def prefix_fvu(sae, x: torch.Tensor, size: int) -> float:
    """FVU of x̂ decoded from the latents of x's code that fall below `size`."""
    code = sae.encode(x)
    inner = Code(code.indices.masked_fill(code.indices >= size, -1), code.values, code.size)
    return fvu(x, sae.decode(inner)).item()


@pytest.mark.parametrize("selection", ["topk", "batchtopk"])
def test_matryoshka_prefixes_reconstruct_alone_where_a_plain_sae_does_not(selection):
    """FVU falls with each prefix (16, 64, 128 latents) and the first 16 alone explain far more than a plain
    TopK/BatchTopK's first 16 (measured 0.56 / 0.49 against 0.88 / 0.87)."""
    sae, r = run("matryoshka", {"k": 4, "prefixes": "1/8,1/2,1", "selection": selection})
    plain, _ = run(selection, {"k": 4}, check_reload=False)
    assert r["fvu"] < 0.2, r
    x = open_source(SourceConfig(kind="synthetic", options=SUPERPOSITION), "eval").next_batch(2048)
    with torch.no_grad():
        nested = [prefix_fvu(sae, x, size) for size in (16, 64, 128)]
        first_plain = prefix_fvu(plain, x, 16)
    assert nested[0] > nested[1] > nested[2], nested
    assert nested[0] < 0.7 * first_plain and nested[0] < 0.65, (nested, first_plain)


def test_the_batchtopk_selection_is_calibrated_to_l0_k_and_topk_needs_no_calibration():
    """As batchtopk: held-out L0 within 2% of k after the trainer's calibration, the EMA far off (measured
    2.35 for k = 4); with selection=topk the threshold is unused and nothing is calibrated."""
    from test_batchtopk import calibrated_run, heldout_l0

    sae, x = calibrated_run("matryoshka", {"prefixes": "1/8,1/2,1"})
    ema, calibrated = heldout_l0(sae, x, sae.threshold_ema), heldout_l0(sae, x, sae.threshold)
    assert abs(ema / 4 - 1) > 0.1, ema
    assert abs(calibrated / 4 - 1) < 0.02, (calibrated, ema)
    assert build("matryoshka", {"d_in": 16, "m": 64, "k": 4, "selection": "topk"}).calibration_rows() == 0


def minilm_dead(store, tmp_path, **coder) -> float:
    """The share of latents of a matryoshka SAE (m = 2,048, k = 16, 300 steps of 256 MiniLM rows) that never fire on
    16,384 rows of the training split."""
    source = SourceConfig(kind="store", path=str(store), heldout=0.25)
    cfg = TrainConfig(method="matryoshka", coder={"m": 2048, "k": 16, **coder}, source=source, steps=300,
                      batch_size=256, lr=3e-3, log_every=100, ckpt_every=10**9, init_rows=4096)
    with one_thread():
        coder_ = train(cfg, tmp_path / "run")
    return evaluate(coder_, open_source(source, "train"), rows=16384, details=False)["never_fired"]


def test_outer_latents_stay_alive_on_minilm(minilm_store, tmp_path):  # noqa: F811
    """Matryoshka's AuxK (4× TopK's weight, over a fortieth of the run) keeps its rarely firing outer latents alive
    on real activations: measured 2.7% never fired, against 4.4% with TopK's AuxK (1/32, a twentieth of the run).
    (This small store leaves some dead either way; on minilm-h at m = 4,096 it is 0.56% against 3.49%.)"""
    ours = minilm_dead(minilm_store, tmp_path / "ours")
    topk = minilm_dead(minilm_store, tmp_path / "topk", aux_coef=1 / 32, dead_tokens=300 * 256 // 20)
    assert ours < 0.75 * topk, (ours, topk)
