"""GLM4-MoE (GLM-4.5 / 4.5-Air): sigmoid group-limited router with a score-correction bias and routed scaling,
shared experts, the first ``first_k_dense_replace`` layers dense, partial RoPE, optional q/k norm, qkv bias."""

from __future__ import annotations

from torch import nn

from .config import Glm4MoeConfig
from .layers import SwiGLU
from .moe import MoE, Experts, SigmoidGroupRouter
from .transformer import MoECausalLM


class Glm4MoeForCausalLM(MoECausalLM):
    config_class = Glm4MoeConfig
    config: Glm4MoeConfig

    def qk_norm(self) -> bool:
        return self.config.use_qk_norm

    def make_mlp(self, layer_idx: int) -> nn.Module:
        c = self.config
        if not c.is_moe_layer(layer_idx):
            return SwiGLU(c.hidden_size, c.intermediate_size)
        gate = SigmoidGroupRouter(
            c.hidden_size,
            c.n_routed_experts,
            c.num_experts_per_tok,
            self.moe_gate_fp32,
            n_group=c.n_group,
            topk_group=c.topk_group,
            norm_topk_prob=c.norm_topk_prob,
            scaling=c.routed_scaling_factor,
        )
        shared = SwiGLU(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else None
        return MoE(gate, Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size), shared)
