"""Fast paths, each beside the reference computation it must agree with (see tests/test_kernels.py)."""
