"""The routed experts in fixed tiles: a token's output does not depend on how many tokens an expert got.

The (token, slot) pairs are laid out by expert, each expert's rows padded to a multiple of ``BM`` (:func:`layout`,
torch ops with static shapes: no host sync, CUDA-graph safe). One program computes a ``BM x BN`` tile of one expert:

1. ``act = silu(x @ gate.T) * (x @ up.T)`` for the tile's rows (gate and up rounded to the model dtype first, as the
   eager path rounds them), K in fixed steps;
2. ``out = act @ down.T``;
3. ``y[t] = sum_j w[t, j] * out[pair (t, j)]`` in slot order j = 0..k-1, in fp32, one rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BM = 64


@triton.jit(do_not_specialize=["n_blocks"])
def _gate_up(x_ptr, w_ptr, act_ptr, pair_ptr, expert_ptr, n_blocks, H, I, TOPK: tl.constexpr,
             s_x, s_we, s_wr, s_act, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    blk = tl.program_id(1)
    e = tl.load(expert_ptr + blk)
    if e >= 0:
        rows = blk * BM + tl.arange(0, BM)
        pair = tl.load(pair_ptr + rows)
        valid = pair >= 0
        tok = tl.where(valid, pair // TOPK, 0).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        w_e = w_ptr + e.to(tl.int64) * s_we
        g = tl.zeros([BM, BN], tl.float32)
        u = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, H, BK):
            kk = k0 + rk
            a = tl.load(x_ptr + tok[:, None] * s_x + kk[None, :], mask=valid[:, None] & (kk < H)[None, :], other=0.0)
            kmask = (kk < H)[:, None] & (rn < I)[None, :]
            wg = tl.load(w_e + rn[None, :].to(tl.int64) * s_wr + kk[:, None], mask=kmask, other=0.0)
            wu = tl.load(w_e + (rn[None, :] + I).to(tl.int64) * s_wr + kk[:, None], mask=kmask, other=0.0)
            g = tl.dot(a, wg, g)
            u = tl.dot(a, wu, u)
        dt = act_ptr.dtype.element_ty
        gb = g.to(dt).to(tl.float32)
        ub = u.to(dt).to(tl.float32)
        silu = (gb / (1.0 + tl.exp(-gb))).to(dt).to(tl.float32)
        act = (silu * ub).to(dt)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * s_act + rn[None, :], act, mask=(rn < I)[None, :])


@triton.jit(do_not_specialize=["n_blocks"])
def _down(act_ptr, w_ptr, out_ptr, expert_ptr, n_blocks, I, H, s_act, s_we, s_wr, s_out,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    blk = tl.program_id(1)
    e = tl.load(expert_ptr + blk)
    if e >= 0:
        rows = (blk * BM + tl.arange(0, BM)).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        w_e = w_ptr + e.to(tl.int64) * s_we
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, I, BK):
            kk = k0 + rk
            a = tl.load(act_ptr + rows[:, None] * s_act + kk[None, :], mask=(kk < I)[None, :], other=0.0)
            w = tl.load(w_e + rn[None, :].to(tl.int64) * s_wr + kk[:, None], mask=(kk < I)[:, None] & (rn < H)[None, :],
                        other=0.0)
            acc = tl.dot(a, w, acc)
        tl.store(out_ptr + rows[:, None] * s_out + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rn < H)[None, :])


@triton.jit
def _combine(out_ptr, row_ptr, w_ptr, y_ptr, H, s_out, s_y, TOPK: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    hmask = h < H
    acc = tl.zeros([BH], tl.float32)
    for j in tl.static_range(TOPK):
        r = tl.load(row_ptr + t * TOPK + j).to(tl.int64)
        w = tl.load(w_ptr + t * TOPK + j)
        o = tl.load(out_ptr + r * s_out + h, mask=hmask, other=0.0).to(tl.float32)
        acc += w * o
    tl.store(y_ptr + t.to(tl.int64) * s_y + h, acc.to(y_ptr.dtype.element_ty), mask=hmask)


def layout(idx: torch.Tensor, num_experts: int, bm: int = BM):
    """Expert ids [T, k] -> (pair of each padded row [R] (-1: padding), expert of each block [R / bm] (-1: unused),
    padded row of each pair [T * k]). R = a static bound: T * k + E * (bm - 1) rounded up to bm."""
    flat = idx.reshape(-1)
    S = flat.numel()
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm
    pad_end = padded.cumsum(0)
    start = counts.cumsum(0) - counts
    sorted_expert = flat[order]
    dest = pad_end[sorted_expert] - padded[sorted_expert] + torch.arange(S, device=idx.device) - start[sorted_expert]
    R = (S + num_experts * (bm - 1) + bm - 1) // bm * bm
    pair_of_row = torch.full((R,), -1, dtype=torch.int32, device=idx.device)
    pair_of_row[dest] = order.to(torch.int32)
    row_of_pair = torch.empty(S, dtype=torch.int32, device=idx.device)
    row_of_pair[order] = dest.to(torch.int32)
    block_start = torch.arange(0, R, bm, device=idx.device)
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return pair_of_row, block_expert, row_of_pair


def config(n: int, k: int) -> dict:
    return dict(BN=64, BK=64, num_warps=4, num_stages=3)


def routed_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """x [T, H], weights fp32 [T, k], idx [T, k], gate_up [E, 2I, H], down [E, H, I] -> [T, H] (no autograd)."""
    T, H = x.shape
    k = idx.shape[1]
    E, two_i, _ = gate_up.shape
    I = two_i // 2
    x = x.contiguous()
    pair_of_row, block_expert, row_of_pair = layout(idx, E)
    R = pair_of_row.numel()
    n_blocks = R // BM
    act = torch.empty(R, I, dtype=x.dtype, device=x.device)
    cfg = config(I, H)
    _gate_up[(triton.cdiv(I, cfg["BN"]), n_blocks)](
        x, gate_up, act, pair_of_row, block_expert, n_blocks, H, I, k, x.stride(0), gate_up.stride(0),
        gate_up.stride(1), act.stride(0), BM=BM, **cfg)
    out = torch.empty(R, H, dtype=x.dtype, device=x.device)
    cfg = config(H, I)
    _down[(triton.cdiv(H, cfg["BN"]), n_blocks)](
        act, down, out, block_expert, n_blocks, I, H, act.stride(0), down.stride(0), down.stride(1), out.stride(0),
        BM=BM, **cfg)
    y = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T:
        _combine[(T, triton.cdiv(H, 1024))](out, row_of_pair, weights.float().contiguous(), y, H, out.stride(0),
                                            y.stride(0), TOPK=k, BH=1024, num_warps=4)
    return y
