"""Layers shared by both families: RMSNorm, (partial) RoPE, GQA attention with a KV cache, SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (the HF order: ``weight * x.to(input_dtype)``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE on the first ``rotary_dim`` dims of each head (all of them unless partial).

    ``cos``/``sin`` are always computed in fp32. With ``fp32=True`` the rotation itself runs in fp32 and the result is
    cast to the activation dtype (the rollout engines' RL mode); otherwise cos/sin are cast to the activation dtype
    first and the rotation runs there, as ``transformers`` does.
    """

    def __init__(self, rotary_dim: int, theta: float, fp32: bool = False):
        super().__init__()
        self.rotary_dim, self.theta, self.fp32 = rotary_dim, theta, fp32
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # not a buffer: a module-wide .to(bf16) must not round it

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
            self._inv_freq[device] = (1.0 / self.theta**exponent).to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> fp32 (cos, sin), each [B, S, rotary_dim]."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D] -> x with its first rotary_dim dims rotated."""
        dtype = x.dtype
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        if self.fp32:
            x = x.float()
        else:
            cos, sin = cos.to(dtype), sin.to(dtype)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        rot = rot * cos + rotated * sin
        return torch.cat((rot, rest), dim=-1).to(dtype) if rest.shape[-1] else rot.to(dtype)


class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding. ``length`` tokens are filled."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int, *, dtype, device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, Hkv, S, D] at the current position; return everything filled so far (incl. these)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention through ``scaled_dot_product_attention`` (flash/efficient kernels on the GPU)."""

    def __init__(self, cfg, layer_idx: int, rope: RotaryEmbedding, qk_norm: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rope = rope

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, S, hidden]. Without ``attn_mask`` attention is causal over this call's tokens (plus the cache)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope.apply(q, *cos_sin), self.rope.apply(k, *cos_sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        causal = attn_mask is None and q.shape[2] == k.shape[2]
        # causal on CUDA (training, full-sequence scoring): the flash kernel reads the kv heads as they are, and the
        # backward keeps them unexpanded. Elsewhere expand them here: every SDPA backend takes that.
        gqa = self.n_kv != self.n_heads and causal and x.is_cuda
        if self.n_kv != self.n_heads and not gqa:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if attn_mask is None and not causal:  # a chunk appended after cached tokens: causal within, full to the past
            attn_mask = causal_mask(q.shape[2], k.shape[2], x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask: query i (at absolute position kv_len - q_len + i) sees keys <= its position."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


class SwiGLU(nn.Module):
    """Dense MLP: ``down(silu(gate(x)) * up(x))`` with the HF parameter names."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
