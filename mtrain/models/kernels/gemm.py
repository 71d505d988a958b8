"""``x @ w.T (+ b)`` in fixed tiles: a row's result does not depend on how many rows are multiplied with it.

The tile sizes are chosen from the weight's shape (N, K) and the dtype, never from M; there is no split-K, and M is
not a specialisation key of the compiled kernel (``do_not_specialize``), so one binary serves every row count. bf16
(or fp16) inputs accumulate in fp32 on the tensor cores and round once; fp32 inputs (the fp32 router gate) multiply in
full IEEE fp32 (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["M"])
def _matmul(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K, s_am, s_bn, s_cm,
            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)  # the row tiles of one weight strip run next to each other: the strip is read once
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * s_am
    b_rows = b_ptr + rn.to(tl.int64)[None, :] * s_bn
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_rows + kk[None, :], mask=(rm < M)[:, None] & (kk < K)[None, :], other=0.0)
        b = tl.load(b_rows + kk[:, None], mask=(kk < K)[:, None] & (rn < N)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + rm.to(tl.int64)[:, None] * s_cm + rn[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


def config(N: int, K: int, dtype: torch.dtype) -> dict:
    """Tiles for a weight of N rows and K columns (a function of the weight only): strips narrow enough that a
    decode step's product has >= ~128 programs reading the weight (bandwidth), wide for the lm_head."""
    if dtype == torch.float32:
        return dict(BM=16, BN=16, BK=32, num_warps=2, num_stages=2)
    bn = 16
    while bn < 128 and N // (2 * bn) >= 128:
        bn *= 2
    return dict(BM=64, BN=bn, BK=64, num_warps=4, num_stages=4)


def matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K].T (+ bias [N]) -> [M, N] in x's dtype."""
    M, K = x.shape
    N = w.shape[0]
    assert w.shape[1] == K and x.dtype == w.dtype, (x.shape, x.dtype, w.shape, w.dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    cfg = config(N, K, x.dtype)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    _matmul[grid](x, w, out, bias if bias is not None else out, M, N, K, x.stride(0), w.stride(0), out.stride(0),
                  HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, **cfg)
    return out
