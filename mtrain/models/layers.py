"""Layers shared by both families: RMSNorm, (partial) RoPE, GQA attention (over a static KV cache when decoding),
SwiGLU MLP. Matmuls and norms go through :mod:`mtrain.models.ops` (plain torch unless the engine's exact mode asks
for batch-invariant kernels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose product is :func:`mtrain.models.ops.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled (the HF order: ``weight * x.to(input_dtype)``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE on the first ``rotary_dim`` dims of each head (all of them unless partial).

    ``cos``/``sin`` are always computed in fp32. With ``rope_fp32=True`` the rotation itself runs in fp32 and the result
    is cast to the activation dtype (the rollout engines' RL mode); otherwise cos/sin are cast to the activation dtype
    first and the rotation runs there, as ``transformers`` does.
    """

    def __init__(self, rotary_dim: int, theta: float, rope_fp32: bool = False):
        super().__init__()
        self.rotary_dim, self.theta, self.rope_fp32 = rotary_dim, theta, rope_fp32
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
        if self.rope_fp32:
            x = x.float()
        else:
            cos, sin = cos.to(dtype), sin.to(dtype)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        half = self.rotary_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        rot = rot * cos + rotated * sin
        return torch.cat((rot, rest), dim=-1).to(dtype) if rest.shape[-1] else rot.to(dtype)


class Attention(nn.Module):
    """Grouped-query attention through ``scaled_dot_product_attention`` (flash/efficient kernels on the GPU), or,
    given a static cache (:class:`mtrain.models.cache.StaticCache`, the rollout engine's), through the cache: each
    token's keys/values are written into its row, then each token attends over its row."""

    def __init__(self, cfg, layer_idx: int, rope: RotaryEmbedding, qk_norm: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias)
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
        cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, S, hidden]. Without ``attn_mask`` attention is causal over this call's tokens; with a ``cache`` each
        token attends over its cache row (``cache.attend``)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, S, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope.apply(q, *cos_sin), self.rope.apply(k, *cos_sin)
        if cache is not None:
            out = cache.attend(self.layer_idx, q.reshape(B * S, self.n_heads, self.head_dim),
                               k.reshape(B * S, self.n_kv, self.head_dim), v.reshape(B * S, self.n_kv, self.head_dim))
            return self.o_proj(out.reshape(B, S, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        causal = attn_mask is None
        # causal on CUDA (training, full-sequence scoring): the flash kernel reads the kv heads as they are, and the
        # backward keeps them unexpanded. Elsewhere expand them here: every SDPA backend takes that.
        gqa = self.n_kv != self.n_heads and causal and x.is_cuda
        if self.n_kv != self.n_heads and not gqa:
            rep = self.n_heads // self.n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    """Dense MLP: ``down(silu(gate(x)) * up(x))`` with the HF parameter names."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
