"""Analytic training FLOPs of an MoE model, counted on ACTIVE parameters (what one token really multiplies by).

Per token, forward + backward = 3 x forward, and a forward matmul with N weights costs 2N FLOPs, so the dense part is
``6 * active_matmul_params``. Active parameters per layer: the attention projections (q, k, v, o and their biases),
the router gate, the ``top_k`` routed experts plus the shared experts (MoE layers) or the dense MLP, and once the
``lm_head`` (tied or not: the output matmul is always done). The embedding lookup is not a matmul and is left out.
Attention scores and the weighted sum add ``6 * 2 * layers * heads * head_dim * seq_len`` per token (PaLM's
``12 * L * H * Q * T``, not halved for causality), with ``seq_len`` the padded width of the batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import MoEConfig

# Dense bf16 peak of one device, TFLOP/s (no sparsity). Matched against torch.cuda.get_device_name() in order.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; the PCIe card is 756
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("4090", 165.0),
)


def active_params_per_token(cfg: MoEConfig) -> int:
    """Matmul weights one token passes through (see module doc)."""
    h, d = cfg.hidden_size, cfg.head_dim_
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if cfg.attention_bias else 0)
    total = 0
    for i in range(cfg.num_hidden_layers):
        total += attn
        if cfg.is_moe_layer(i):
            total += h * cfg.num_experts  # router gate
            total += cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
            total += 3 * h * cfg.shared_expert_intermediate_size
        else:
            total += 3 * h * cfg.intermediate_size
    return total + h * cfg.vocab_size  # lm_head


def train_flops_per_token(cfg: MoEConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token at sequence width ``seq_len``."""
    attn_scores = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim_ * seq_len
    return 6.0 * active_params_per_token(cfg) + attn_scores


def eval_flops_per_token(cfg: MoEConfig, seq_len: int) -> float:
    """Forward-only FLOPs per token (a third of training)."""
    return train_flops_per_token(cfg, seq_len) / 3.0


def peak_tflops(configured: Optional[float], accelerator_is_cuda: bool) -> float:
    """Per-device peak in TFLOP/s: the configured value if set (0 = no MFU); else from the CUDA device name; else 0."""
    if configured is not None:
        return float(configured)
    if not accelerator_is_cuda:
        return 0.0
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return 0.0
