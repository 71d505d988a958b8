"""Row-wise kernels, one program per row, the row reduced in fixed blocks in order: RMSNorm, the log-probability of
a chosen token, and Gumbel-max sampling whose noise is a function of (seed, request row, step, token id)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MASK32 = 0xFFFFFFFF


@triton.jit
def _rms_norm(x_ptr, w_ptr, y_ptr, H, s_x, s_y, eps, BH: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BH)
    m = h < H
    x = tl.load(x_ptr + r * s_x + h, mask=m, other=0.0).to(tl.float32)
    var = tl.sum(x * x, 0) / H
    dt = y_ptr.dtype.element_ty
    xn = (x * tl.math.rsqrt(var + eps)).to(dt)
    w = tl.load(w_ptr + h, mask=m, other=0.0)
    tl.store(y_ptr + r * s_y + h, (w * xn).to(dt), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dim (the HF order), in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        H = shape[-1]
        _rms_norm[(x2.shape[0],)](x2, weight.to(x.dtype), y, H, x2.stride(0), y.stride(0), eps,
                                  BH=triton.next_power_of_2(H), num_warps=4 if H <= 2048 else 8)
    return y.view(shape)


@triton.jit
def _logprob(logits_ptr, tok_ptr, out_ptr, V, s_l, inv_t, BV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    base = logits_ptr + r * s_l
    tok = tl.load(tok_ptr + r)
    m = tl.full([BV], float("-inf"), tl.float32)
    s = tl.zeros([BV], tl.float32)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        x = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, x)
        alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m - m_new))
        s = s * alpha + tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
    mx = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx)), 0)
    x_t = tl.load(base + tl.maximum(tok, 0)).to(tl.float32) * inv_t
    lp = x_t - mx - tl.log(total)
    tl.store(out_ptr + r, tl.where(tok >= 0, lp, 0.0))


def logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [R, V] (any float dtype), tokens [R] -> fp32 log softmax(logits / T)[token] (0 where token < 0)."""
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        _logprob[(R,)](logits, tokens.contiguous(), out, V, logits.stride(0), 1.0 / temperature, BV=2048,
                       num_warps=8)
    return out


@triton.jit
def _mix(x):
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _sample(logits_ptr, key_ptr, thr_ptr, out_ptr, V, s_l, inv_t, GREEDY: tl.constexpr, BV: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    base = logits_ptr + r * s_l
    key = tl.load(key_ptr + r)
    thr = tl.load(thr_ptr + r)
    best = tl.full([BV], float("-inf"), tl.float32)
    best_i = tl.zeros([BV], tl.int32)
    for v0 in range(0, V, BV):
        v = v0 + tl.arange(0, BV)
        x = tl.load(base + v, mask=v < V, other=float("-inf")).to(tl.float32)
        if GREEDY:
            score = x
        else:  # the nucleus on the unscaled logits; u in (0, 1) from 23 bits (ops.uniform)
            h = _mix(key ^ ((v.to(tl.int64) * 0x9E3779B1) & 0xFFFFFFFF))
            u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            score = tl.where(x >= thr, x * inv_t - tl.log(-tl.log(u)), float("-inf"))
        take = score > best
        best = tl.where(take, score, best)
        best_i = tl.where(take, v, best_i)
    mx = tl.max(best, 0)
    idx = tl.min(tl.where(best == mx, best_i, 2147483647), 0)
    tl.store(out_ptr + r, idx.to(tl.int64))


def sample(logits: torch.Tensor, keys: torch.Tensor, threshold: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-max over logits [R, V] / T with per-row noise keys [R] (int64 < 2^32), keeping tokens whose (unscaled)
    logit >= threshold[R] (top-p); temperature 0 = argmax. Ties go to the lowest token id."""
    R, V = logits.shape
    out = torch.empty(R, dtype=torch.int64, device=logits.device)
    if R:
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        greedy = temperature <= 0
        _sample[(R,)](logits, keys, threshold.float(), out, V, logits.stride(0),
                      1.0 if greedy else 1.0 / temperature, GREEDY=greedy, BV=2048, num_warps=8)
    return out
