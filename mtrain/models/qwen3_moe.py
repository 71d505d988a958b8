"""Qwen3-MoE: softmax top-k router, q/k RMSNorm per head, full RoPE, MoE every ``decoder_sparse_step`` layers."""

from __future__ import annotations

from torch import nn

from .config import Qwen3MoeConfig
from .layers import SwiGLU
from .moe import MoE, Experts, SoftmaxTopKRouter
from .transformer import MoECausalLM


class Qwen3MoeForCausalLM(MoECausalLM):
    config_class = Qwen3MoeConfig
    config: Qwen3MoeConfig

    def qk_norm(self) -> bool:
        return True

    def make_mlp(self, layer_idx: int) -> nn.Module:
        c = self.config
        if not c.is_moe_layer(layer_idx):
            return SwiGLU(c.hidden_size, c.intermediate_size)
        gate = SoftmaxTopKRouter(
            c.hidden_size, c.num_experts, c.num_experts_per_tok, self.moe_gate_fp32, norm_topk_prob=c.norm_topk_prob
        )
        return MoE(gate, Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size))
