"""The decoder stack both families share; an architecture only says which MLP each layer gets.

Parameter names follow ``transformers`` v5 in memory (``model.layers.L.self_attn.q_proj.weight``, fused
``mlp.experts.gate_up_proj``), so the HF key adapter (``adapter.py``) only has to split/fuse experts. Nothing here
names a family's parameters: a family subclass says which MLP each layer gets and whether q/k are normed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import MoEConfig
from .layers import Attention, RMSNorm, RotaryEmbedding
from .loss import linear_cross_entropy
from .moe import Router
from .precision import PrecisionPolicy
from .routing import RoutingTrace


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_idx: int, rope: RotaryEmbedding, mlp: nn.Module, qk_norm: bool):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, rope, qk_norm)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.is_moe:
            mlp.layer_idx = layer_idx

    @property
    def is_moe(self) -> bool:
        return hasattr(self.mlp, "gate")

    def forward(self, x, cos_sin, cache=None, attn_mask=None, trace: RoutingTrace | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, cache, attn_mask)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, trace) if self.is_moe else self.mlp(h))


class Backbone(nn.Module):
    def __init__(self, cfg: MoEConfig, layers: list[DecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoECausalLM(nn.Module):
    """A decoder-only MoE language model. Subclasses implement :meth:`make_mlp` and :meth:`qk_norm`.

    ``forward(input_ids) -> logits [B, S, V]``; :meth:`loss` computes the causal-LM loss through a chunked
    linear + cross-entropy that never materialises the full logits.
    """

    config_class: type[MoEConfig] = MoEConfig

    def __init__(self, cfg: MoEConfig, policy: PrecisionPolicy = PrecisionPolicy()):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.policy = policy
        self.rope = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, rope_fp32=policy.rope_fp32)
        layers = [
            DecoderLayer(cfg, i, self.rope, self.make_mlp(i), self.qk_norm()) for i in range(cfg.num_hidden_layers)
        ]
        self.model = Backbone(cfg, layers)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False

    @property
    def moe_gate_fp32(self) -> bool:
        return self.policy.moe_gate_fp32

    @property
    def rope_fp32(self) -> bool:
        return self.policy.rope_fp32

    # -- what an architecture defines ----------------------------------------------------------------------------
    def make_mlp(self, layer_idx: int) -> nn.Module:
        raise NotImplementedError

    def qk_norm(self) -> bool:
        raise NotImplementedError

    # -- forward -------------------------------------------------------------------------------------------------
    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cache=None,
        attn_mask: torch.Tensor | None = None,
        trace: RoutingTrace | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, S, hidden]. ``trace`` records or replays each MoE layer's experts (also
        through activation checkpointing). ``attn_mask`` (bool, broadcastable to [B, 1, S, S]) replaces the causal
        mask; ``cache`` (a :class:`~mtrain.models.cache.StaticCache` bound to each token's slot and position) makes
        each token attend over its cache row instead."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        cos_sin = self.rope(position_ids)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos_sin, cache, attn_mask, trace, use_reentrant=False)
            else:
                x = layer(x, cos_sin, cache, attn_mask, trace)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """input_ids [B, S] -> logits [B, S, V] in the model dtype. Keyword arguments as :meth:`hidden_states`."""
        h = self.hidden_states(input_ids, **kwargs)
        return ops.linear(h, self.output_weight)

    def loss(
        self, input_ids: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = 2048, trace: RoutingTrace | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy of ``targets`` (already shifted: ``targets[:, t]`` follows ``input_ids[:, :t+1]``;
        -100 = ignore), computed in fp32 chunk by chunk (``chunk_size`` tokens) from the hidden states. 2048: a lower
        peak than 4096 at the same speed on a real-size step (``benchmarks/memory_split.py``; numbers in
        ``benchmarks/RESULTS.md``)."""
        h = self.hidden_states(input_ids, trace=trace)
        total, count = linear_cross_entropy(h.flatten(0, 1), self.output_weight, targets.flatten(), chunk_size)
        return total / count.clamp(min=1)

    def compile_layers(self, **kwargs) -> "MoECausalLM":
        """``torch.compile`` each decoder layer in place (fuses norms, RoPE, SwiGLU and the routing glue; the
        expert GEMMs stay grouped GEMMs). Returns self."""
        for layer in self.model.layers:
            layer.compile(**kwargs)
        return self

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if layer.is_moe]

    def gate_dtype(self) -> torch.dtype | None:
        gates = [layer.mlp.gate.weight.dtype for layer in self.model.layers if layer.is_moe]
        return gates[0] if gates else None

    def routers(self) -> list[tuple[str, Router]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, Router)]

    def fp32_names(self) -> set[str]:
        """Names of the tensors the precision policy keeps in fp32 whatever the model dtype (each router says which
        of its tensors: the gate weight under ``moe_gate_fp32``, GLM's score-correction bias always)."""
        out = set()
        for prefix, router in self.routers():
            own = {id(t): n for n, t in list(router.named_parameters()) + list(router.named_buffers())}
            out |= {f"{prefix}.{own[id(t)]}" for t in router._fp32_tensors()}
        return out

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random init in the HF style: normal(0, initializer_range) matrices, zero biases, unit norms."""
        std = self.config.initializer_range
        gens: dict[torch.device, torch.Generator] = {}
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                if seed is not None and p.device not in gens:
                    gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                p.normal_(0.0, std, generator=gens.get(p.device))
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        for _, router in self.routers():
            router.init_buffers()
