"""Attention of each query token over its own row of a static KV cache.

``q [T, Hq, D]`` attends to ``k_cache/v_cache [slots, Hkv, max_len, D]`` at row ``rows[t]``, keys ``0 .. lens[t]-1``
(the token's own key included: the cache is written before attention). One program per (token, kv head) computes
the ``Hq / Hkv`` query heads of its group, keys in fixed blocks of ``BLOCK_N`` in order, with an online softmax in
fp32: a token's result depends only on its query and its row's keys, so a prefill, a decode step and a recompute of
the same token give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cache_attention(q_ptr, k_ptr, v_ptr, o_ptr, rows_ptr, lens_ptr,
                     sq_t, sq_h, sk_r, sk_h, sk_s, so_t, so_h, scale,
                     G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + t).to(tl.int64)
    n = tl.load(lens_ptr + t)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    head = kvh * G + g
    gmask = g < G
    q = tl.load(q_ptr + t.to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    k_base = k_ptr + row * sk_r + kvh * sk_h
    v_base = v_ptr + row * sk_r + kvh * sk_h
    for start in range(0, n, BLOCK_N):
        s_idx = start + tl.arange(0, BLOCK_N)
        smask = s_idx < n
        k = tl.load(k_base + s_idx[:, None] * sk_s + d[None, :], mask=smask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(smask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        den = den * alpha + tl.sum(p, 1)
        v = tl.load(v_base + s_idx[:, None] * sk_s + d[None, :], mask=smask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / den[:, None]
    tl.store(o_ptr + t.to(tl.int64) * so_t + head[:, None] * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=gmask[:, None])


def attention_supported(head_dim: int, group: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and group <= 64


def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                    lens: torch.Tensor, block_n: int = 64) -> torch.Tensor:
    """q [T, Hq, D] (last dim contiguous), caches [slots, Hkv, max_len, D], rows/lens [T] int -> [T, Hq, D]."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    out = torch.empty_like(q)
    if T == 0:
        return out
    assert k_cache.stride(-1) == 1 and q.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    _cache_attention[(T, Hkv)](
        q, k_cache, v_cache, out, rows, lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        out.stride(1), D ** -0.5,
        G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=D, BLOCK_N=block_n, num_warps=4, num_stages=2,
    )
    return out
