import pytest
import torch
from sae_helpers import run

from sparsecode.coder import build
from sparsecode.errors import SparsecodeError


def test_prefix_losses_one_per_nested_prefix():
    sae = build("matryoshka", {"d_in": 16, "m": 64, "k": 4, "prefixes": "1/8,1/2,1"})
    assert sae.sizes == [8, 32, 64]
    sae.train()
    out = sae(torch.randn(32, 16))
    assert set(out.losses) == {"fvu", "fvu@8", "fvu@32"}


@pytest.mark.parametrize("bad", ["1/2", "0,1", "a,1", "1/0,1"])
def test_bad_prefixes_are_refused(bad):
    with pytest.raises(SparsecodeError, match="prefixes"):
        build("matryoshka", {"d_in": 16, "m": 64, "k": 4, "prefixes": bad})


def test_bad_selection_is_refused():
    with pytest.raises(SparsecodeError, match="selection"):
        build("matryoshka", {"d_in": 16, "m": 64, "k": 4, "selection": "top"})


@pytest.mark.parametrize("selection", ["topk", "batchtopk"])
def test_matryoshka_trains_and_its_first_prefix_reconstructs_alone(selection):
    """The full dictionary reaches low FVU; the first eighth (16 latents for 64 features) alone explains
    a good part of the variance, which an ordinary TopK SAE's first 16 latents do not."""
    sae, r = run("matryoshka", {"k": 4, "prefixes": "1/8,1/2,1", "selection": selection})
    assert r["fvu"] < 0.2, r
    assert 2.5 < r["l0"] <= 4.0 + 2.0 * (selection == "batchtopk"), r
    from sparsecode.data.source import SourceConfig, open_source
    from sparsecode.metrics import fvu

    x = open_source(SourceConfig(kind="synthetic", options={"d": 32, "n_features": 64, "active": 2}),
                    "eval").next_batch(2048)
    code = sae.encode(x)
    inner = type(code)(code.indices.masked_fill(code.indices >= 16, -1), code.values, code.size)
    assert fvu(x, sae.decode(inner)).item() < 0.75
