"""Mixture-of-experts: the two routers, the routed experts (grouped GEMM or a plain loop), and the MoE block.

Routing can be recorded or replayed per layer through a :class:`~mtrain.models.routing.RoutingTrace`.
The gate precision policy lives here, in :class:`Router`:

* ``moe_gate_fp32=True``: the gate weight is an fp32 parameter and stays fp32 through ``module.to(bf16)``
  (and so through Lightning's precision plugins); logits, scores, bias add and top-k run in fp32 with autocast off.
  In the backward, the weight's gradient is an fp32 GEMM; the input's gradient, which leaves in the model dtype
  anyway, is a GEMM in the model dtype (:class:`_Fp32Gate`).
* ``moe_gate_fp32=False``: the gate weight is in the model dtype and the logits come out of a model-dtype GEMM, as
  inference engines run it by default; scores and top-k are then computed in fp32 from those logits.

GLM's ``e_score_correction_bias`` is always fp32. Experts always run in the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .grouped import routed_experts
from .layers import SwiGLU
from .routing import RoutingTrace


class _Fp32Gate(torch.autograd.Function):
    """``x @ w.T`` in fp32 (the forward an engine's fp32 gate computes, bit for bit). Backward: ``dw`` by an fp32 GEMM;
    ``dx`` by a GEMM in ``x``'s dtype -- it is rounded to that dtype on the way out anyway, and in bf16 an fp32 GEMM
    runs without tensor cores, many times slower (``benchmarks/RESULTS.md``, the fp32 gate's backward). Keeps ``x``
    in its own dtype for the backward, not an fp32 copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = grad.to(x.dtype) @ w.to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (grad.t().float() @ x.float()).to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class Router(nn.Module):
    """Gate GEMM ``[T, hidden] -> [T, E]`` logits under the gate precision policy. Subclasses pick the experts."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, moe_gate_fp32: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.num_experts, self.top_k, self.moe_gate_fp32 = num_experts, top_k, moe_gate_fp32

    def _fp32_tensors(self) -> list[torch.Tensor]:
        return [self.weight] if self.moe_gate_fp32 else []

    def _apply(self, fn, recurse=True):
        """Keep the policy's fp32 tensors fp32 through dtype casts (``.to(bf16)``, ``.half()``, precision plugins)."""
        keep = {id(t) for t in self._fp32_tensors()}
        if not keep:
            return super()._apply(fn, recurse)

        def cast_except_fp32(t):
            out = fn(t)
            if id(t) in keep and out.is_floating_point() and out.dtype != torch.float32:
                return t.to(device=out.device)  # keep the move, undo the cast (from the original, not the rounded)
            return out

        return super()._apply(cast_except_fp32, recurse)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> logits [T, E]: fp32 under the fp32 policy, else the model dtype."""
        if self.moe_gate_fp32:
            with torch.autocast(x.device.type, enabled=False):
                if ops.invariant_active():  # inference only: the batch-invariant fp32 product
                    return ops.linear(x.float(), self.weight.float())
                return _Fp32Gate.apply(x, self.weight)
        return ops.linear(x, self.weight.to(x.dtype))

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None):
        """x [T, hidden] -> (weights fp32 [T, k], expert indices int64 [T, k], fp32 logits [T, E], own).

        ``idx`` (replay): use these experts instead of choosing (a token whose ids are -1 chooses its own); the
        weights still come from the live scores. ``own``: the experts the router would have chosen (replay only,
        else None)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = self.logits(x).float()
            own = None
            if idx is not None:
                own = self.route(logits.detach())[1]
                idx = torch.where(idx >= 0, idx, own)
            weights, idx = self.route(logits, idx)
            return weights, idx, logits, own

    def route(self, logits: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits [T, E] -> (weights [T, k], experts [T, k]); with ``idx`` given, only the weights."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """Reset non-parameter state to its initial value (called by ``MoECausalLM.init_weights``)."""

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, E] -> each token's routing distribution over the experts [T, E] (rows sum to 1): what a
        load-balancing loss weighs (:mod:`mtrain.models.balance`)."""
        raise NotImplementedError

    @property
    def expert_bias(self) -> torch.Tensor | None:
        """The fp32 bias added to the scores for selection only (aux-loss-free balancing updates it), or None."""
        return None


class SoftmaxTopKRouter(Router):
    """Qwen3-MoE: softmax over all experts, top-k, optional renormalisation."""

    def __init__(self, hidden, num_experts, top_k, moe_gate_fp32, norm_topk_prob: bool):
        super().__init__(hidden, num_experts, top_k, moe_gate_fp32)
        self.norm_topk_prob = norm_topk_prob

    def route(self, logits, idx=None):
        probs = logits.softmax(dim=-1)
        if idx is None:
            weights, idx = ops.topk(probs, self.top_k)
        else:
            weights = probs.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / ops.slot_sum(weights)
        return weights, idx

    def probs(self, logits):
        return logits.softmax(dim=-1)


class SigmoidGroupRouter(Router):
    """GLM4-MoE (DeepSeek-V3 style): sigmoid scores; experts chosen on ``scores + bias`` within the ``topk_group``
    best of ``n_group`` groups (group score = sum of its top-2); weights are the un-biased scores, renormalised if
    ``norm_topk_prob``, times ``routed_scaling_factor``."""

    def __init__(self, hidden, num_experts, top_k, moe_gate_fp32, *, n_group, topk_group, norm_topk_prob, scaling):
        super().__init__(hidden, num_experts, top_k, moe_gate_fp32)
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.scaling = norm_topk_prob, scaling
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))

    def _fp32_tensors(self):
        return super()._fp32_tensors() + [self.e_score_correction_bias]

    def init_buffers(self) -> None:
        self.e_score_correction_bias.zero_()

    @property
    def expert_bias(self):
        return self.e_score_correction_bias

    def probs(self, logits):
        """The sigmoid scores normalised over all experts (DeepSeek-V3's sequence-wise balance loss)."""
        scores = logits.sigmoid()
        return scores / scores.sum(dim=-1, keepdim=True)

    def route(self, logits, idx=None):
        scores = logits.sigmoid()
        if idx is None:
            idx = self.choose(scores)
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (ops.slot_sum(weights) + 1e-20)
        return weights * self.scaling, idx

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k experts by ``scores + bias`` within the best groups (selection only: the bias never weights)."""
        choice = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            T = choice.shape[0]
            grouped = choice.view(T, self.n_group, -1)
            group_scores = ops.slot_sum(ops.topk(grouped, 2)[0]).squeeze(-1)
            keep = ops.topk(group_scores, self.topk_group, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view(T, -1)
        return ops.topk(choice, self.top_k, sorted=False)[1]


class Experts(nn.Module):
    """E SwiGLU experts stored fused as in ``transformers`` v5: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I].

    :func:`~mtrain.models.grouped.routed_experts` runs them: on CUDA in bf16 one grouped GEMM each (``backend``
    ``"auto"``/``"grouped_mm"``), elsewhere (and with ``backend="loop"``) a loop computes exactly the per-expert
    products; the backward pass keeps only the gate/up projection's output.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, backend: str = "auto"):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.backend = backend

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], the router's weights and expert ids [T, k] -> the weighted sum of each token's experts."""
        if ops.experts_kernel_ok(x):
            return ops.experts_invariant(x, weights, idx, self.gate_up_proj, self.down_proj)
        return routed_experts(x, weights, idx, self.gate_up_proj, self.down_proj, self.backend)


class MoE(nn.Module):
    """Route, sort tokens by expert, run the experts, weight and un-permute without atomics (deterministic)."""

    def __init__(self, gate: Router, experts: Experts, shared_experts: SwiGLU | None = None):
        super().__init__()
        self.gate, self.experts, self.shared_experts = gate, experts, shared_experts
        self.layer_idx = -1  # set by the decoder layer: the key of this layer in a RoutingTrace
        self.tap = None  # an observer of the routing (mtrain.models.router_stats.RouterStats), or None

    def forward(self, x: torch.Tensor, trace: RoutingTrace | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        forced = trace.forced(self.layer_idx, shape[:-1]) if trace is not None else None
        weights, idx, logits, own = self.gate(x, forced)  # [T, k], [T, k], [T, E], [T, k] or None
        if trace is not None:
            trace.record(self.layer_idx, idx, logits, shape[:-1], own)
        if self.tap is not None:  # load counts and balancing losses from this routing (no extra forward)
            self.tap(self, logits, idx, shape[:-1])
        y = self.experts(x, weights, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
