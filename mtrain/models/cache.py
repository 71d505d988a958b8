"""The rollout engine's static KV cache: one preallocated row ("slot") per sequence.

A forward over a flat list of tokens (``input_ids [1, T]``) is told, per token, its slot and its position
(:meth:`StaticCache.bind`). Each attention layer then writes the tokens' keys/values at (slot, position) and lets
every token attend over its slot's positions ``0 .. position``: a prefill (many tokens of a slot at once), a decode
step (one token of each of many slots) and a recompute of whole sequences are the same call, and a token's attention
depends only on its own row (:mod:`mtrain.models.kernels.attention`; on the CPU a torch version).

The tensors never move or change size, so a decode step captured in a CUDA graph reads and writes them in place;
the slot/position tensors the step reads are static too (the caller copies into them).
"""

from __future__ import annotations

import torch

from . import kernels


class StaticCache:
    def __init__(self, num_layers: int, slots: int, num_kv_heads: int, max_len: int, head_dim: int, *, dtype,
                 device):
        max_len = -(-max_len // 16) * 16  # whole blocks of keys (the CPU attention reads 16 at a time)
        shape = (slots, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.max_len = slots, max_len
        self.rows: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.lens: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, slots: int, max_len: int) -> "StaticCache":
        cfg = model.config
        w = model.output_weight
        return cls(len(model.model.layers), slots, cfg.num_key_value_heads, max_len, cfg.head_dim_, dtype=w.dtype,
                   device=w.device)

    def bind(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """The slot and position [T] of each token of the next forward."""
        self.rows, self.positions = rows, positions
        self.lens = (positions + 1).to(torch.int32)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the bound tokens -> attention output [T, Hq, D]."""
        kc, vc = self.k[layer], self.v[layer]
        kc[self.rows, :, self.positions] = k.to(kc.dtype)
        vc[self.rows, :, self.positions] = v.to(vc.dtype)
        if q.is_cuda and kernels.attention_supported(q.shape[-1], q.shape[1] // k.shape[1]):
            return kernels.cache_attention(q.contiguous(), kc, vc, self.rows.to(torch.int32), self.lens)
        return _attend_torch(q, kc, vc, self.rows, self.lens)

    def advance(self, n: int) -> None:
        """Nothing: positions are given per token (the interface the model calls after a forward)."""


def _attend_torch(q, kc, vc, rows, lens, block: int = 16):
    """Each token over its row's first ``lens`` keys, in fp32, in fixed blocks of ``block`` keys with an online
    softmax (as the CUDA kernel): a token's result depends neither on the other tokens of the call nor on the cache
    width. (Every token sees at least its own key, so after the first block the running max is finite and masked
    keys contribute exactly exp(-inf) = 0.)"""
    T, Hq, D = q.shape
    Hkv = kc.shape[1]
    rep = Hq // Hkv
    qf = q.float().view(T, Hkv, rep, D) * D**-0.5
    m = q.new_full((T, Hkv, rep), float("-inf"), dtype=torch.float32)
    den = torch.zeros_like(m)
    acc = q.new_zeros((T, Hkv, rep, D), dtype=torch.float32)
    offsets = torch.arange(block, device=q.device)
    for s0 in range(0, int(lens.max()) if T else 0, block):
        kb = kc[rows, :, s0 : s0 + block].float()  # [T, Hkv, block, D]
        vb = vc[rows, :, s0 : s0 + block].float()
        hidden = ((s0 + offsets)[None, :] >= lens[:, None])[:, None, None, :]  # [T, 1, 1, block]
        s = torch.matmul(qf, kb.transpose(-1, -2)).masked_fill_(hidden, float("-inf"))  # [T, Hkv, rep, block]
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new[..., None])
        den = den * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.matmul(p, vb)
        m = m_new
    return (acc / den[..., None]).view(T, Hq, D).to(q.dtype)
