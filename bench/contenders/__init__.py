"""The contenders of bench/throughput.py, one module each. Every module has `build(sizes, x, dev, run,
args) -> Contender` (bench/throughput_harness.py): it builds the contender for one case and returns its
training step. A peer's imports sit inside its `build`, so a peer that is not installed is skipped.

The lists name each contender as the skip notes do, in the order they are built and timed.
"""

from . import plain_topk, saelens_topk, sparsecode_topk, sparsecode_vq, sparsify_topk, vqp_vq

TOPK = [("sparsecode", sparsecode_topk.build), ("SAELens", saelens_topk.build), ("sparsify", sparsify_topk.build),
        ("plain", plain_topk.build)]
VQ = [("sparsecode", sparsecode_vq.build), ("vector-quantize-pytorch", vqp_vq.build)]
