"""Fused nearest-code search (Triton): each program keeps a tile of rows, walks the codebook in tiles,
computes ‖c‖² − 2⟨x, c⟩ with `tl.dot` (fp32 accumulate; TF32 on GPUs that have it) and keeps a running
min/argmin in registers, so no [B, K] distance matrix is ever written to memory.

Used by `vq.search.nearest` for CUDA tensors when Triton is installed; the chunked PyTorch search is the
reference and the fallback. With TRITON_INTERPRET=1 set before Triton is imported, the same kernel runs on
CPU tensors (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the PyTorch search serves every device
    triton = None

if triton is not None:

    @triton.jit
    def nearest_kernel(x_ptr, c_ptr, csq_ptr, out_ptr, n_rows, n_codes, dim, stride_x, stride_c,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        best = tl.full((BLOCK_M,), float("inf"), tl.float32)
        best_idx = tl.zeros((BLOCK_M,), tl.int32)
        for n0 in range(0, n_codes, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < n_codes
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, dim, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < dim
                xb = tl.load(x_ptr + rows[:, None] * stride_x + ds[None, :], row_ok[:, None] & d_ok[None, :], 0.0)
                cb = tl.load(c_ptr + cols[:, None] * stride_c + ds[None, :], col_ok[:, None] & d_ok[None, :], 0.0)
                acc += tl.dot(xb, tl.trans(cb))
            csq = tl.load(csq_ptr + cols, col_ok, float("inf"))  # padding codes are infinitely far
            dist = csq[None, :] - 2.0 * acc
            tile_min = tl.min(dist, axis=1)
            tile_idx = tl.argmin(dist, axis=1) + n0
            better = tile_min < best  # strict: ties keep the lower index, as the reference does
            best = tl.where(better, tile_min, best)
            best_idx = tl.where(better, tile_idx, best_idx)
        tl.store(out_ptr + rows, best_idx, row_ok)


@torch.no_grad()
def nearest_fused(x: Tensor, codes: Tensor, block_m: int = 64, block_n: int = 128, block_d: int = 32) -> Tensor:
    """[B] index of each row's nearest code by L2 (lowest index on ties, up to the dot's rounding)."""
    x, codes = x.float().contiguous(), codes.float().contiguous()
    n, d = x.shape
    out = torch.empty(n, dtype=torch.int32, device=x.device)
    nearest_kernel[(triton.cdiv(n, block_m),)](x, codes, codes.pow(2).sum(1), out, n, codes.shape[0], d,
                                               x.stride(0), codes.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                               BLOCK_D=block_d)
    return out.long()
