import pytest

from sparsecode.coder import build, get_method, methods
from sparsecode.errors import SparsecodeError


def test_registry_lists_both_families():
    names = methods()
    assert {"topk", "vq"} <= set(names)
    assert get_method("topk").name == "topk"


def test_unknown_method_names_the_choices():
    with pytest.raises(SparsecodeError, match="unknown method 'topkk' \\(did you mean 'topk'\\?\\)"):
        get_method("topkk")


def test_unknown_option_and_out_of_range_values():
    with pytest.raises(SparsecodeError, match="unknown 'topk' option 'kk'"):
        build("topk", {"d_in": 8, "m": 16, "kk": 3})
    with pytest.raises(SparsecodeError, match="k must be in 1..m=16, got k=17"):
        build("topk", {"d_in": 8, "m": 16, "k": 17})
    with pytest.raises(SparsecodeError, match="metric must be"):
        build("vq", {"d_in": 8, "m": 16, "metric": "l3"})
    with pytest.raises(SparsecodeError, match="d_in must be positive"):
        build("vq", {"m": 16})


def test_wrong_input_width_is_one_clear_error():
    import torch

    coder = build("topk", {"d_in": 8, "m": 16, "k": 2})
    with pytest.raises(SparsecodeError, match=r"input has shape \(4, 7\), expected \[batch, 8\]"):
        coder.encode(torch.zeros(4, 7))
