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


def test_one_name_for_data_initialisation_and_old_names_still_load():
    """`init` names how every codebook starts; configs saved with kmeans_init / data_init load as before."""
    assert build("vq", {"d_in": 8, "m": 16, "kmeans_init": False}).cfg.init == "random"
    assert build("vq_factorized", {"d_in": 8, "m": 16, "kmeans_init": True}).cfg.init == "kmeans"
    assert build("simvq", {"d_in": 8, "m": 16, "data_init": False}).cfg.init == "random"
    assert build("vqbridge", {"d_in": 8, "m": 16, "data_init": False}).cfg.init == "zero"
    for method in ("vq", "vq_factorized", "frozen_projector", "kvbottleneck"):
        assert build(method, {"d_in": 8, "m": 16, "kmeans_iters": 3}).cfg.kmeans_iters == 3
    with pytest.raises(SparsecodeError, match="init must be 'kmeans' or 'random'"):
        build("vq", {"d_in": 8, "m": 16, "init": "data"})
    with pytest.raises(SparsecodeError, match="kmeans_iters must be non-negative"):
        build("frozen_projector", {"d_in": 8, "m": 16, "kmeans_iters": -1})


def test_a_derived_option_is_never_rewritten():
    """FSQ's m follows from its levels: a config that disagrees is refused by name, the caller's dict is kept."""
    options = {"d_in": 8, "levels": [5, 5, 5]}
    assert build("fsq", options).cfg.m == 3 and "m" not in options
    assert build("fsq", {**options, "m": 3}).cfg.m == 3  # as saved beside the weights
    with pytest.raises(SparsecodeError, match=r"'fsq' option 'm' follows from the others \(m=3\), got m=4"):
        build("fsq", {**options, "m": 4})


def test_an_option_dropped_since_a_run_was_saved_still_loads():
    """vsae's sparse_grad (it could only be false) is gone: old configs holding it load, a true one is refused."""
    assert not hasattr(build("vsae", {"d_in": 8, "m": 16, "k": 2, "sparse_grad": False}).cfg, "sparse_grad")
    with pytest.raises(SparsecodeError, match="unknown 'vsae' option 'sparse_grad'"):
        build("vsae", {"d_in": 8, "m": 16, "k": 2, "sparse_grad": True})
