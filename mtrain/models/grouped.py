"""The routed experts of a MoE layer as one autograd function that keeps little for the backward pass.

Forward, per layer (``S = T * k`` token-expert pairs, sorted by expert)::

    xs  = x[order // k]                         gather: row p is the token of the p-th pair          [S, H]
    h   = xs @ gate_up[e].T  per expert         one grouped GEMM                                     [S, 2I]
    a   = silu(h_gate) * h_up                                                                         [S, I]
    o   = a @ down[e].T      per expert         one grouped GEMM                                     [S, H]
    y   = sum_j w[t, j] * o[pair (t, j)]        gather back to (token, slot), weighted k-sum          [T, H]
                                                (compiled: one fused fp32 pass; eager: a [k]-wide bmm)

Autograd on these ops keeps ``xs``, ``h``, ``silu(h_gate)``, ``a`` and ``o``'s gather (~0.9 GiB a layer at the
Qwen3-30B-A3B shape and 8k tokens). This function keeps only ``h`` (plus the input ``x``, which the router keeps
anyway): the backward gathers ``xs`` again and recomputes ``a`` from ``h`` (a gather and an elementwise pass, no
GEMM), and never needs ``o``: with ``g = dy[token] @ down[e]`` (the GEMM the input gradient needs anyway),
``d w[t, j] = <g, a>`` and ``d a = w * g``. The input gradient sums each token's ``k`` pair rows in fp32 through
the inverse permutation (no scatter-add: deterministic).

On CUDA in bf16 the per-expert products are ``torch._grouped_mm`` calls; elsewhere a loop over experts computes
exactly the per-expert products (the CPU and fp32 path the parity tests run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def uses_grouped_mm(x: torch.Tensor, backend: str) -> bool:
    """Whether the experts run as grouped GEMMs: ``backend="grouped_mm"``, or ``"auto"`` on CUDA in bf16."""
    if _grouped_mm is None:
        return False
    return backend == "grouped_mm" or (backend == "auto" and x.is_cuda and x.dtype == torch.bfloat16)


class _Groups:
    """Where each expert's rows lie in the sorted buffer: ``offs`` (int32 cumulative ends) for the grouped GEMM,
    python row counts for the loop."""

    def __init__(self, counts: torch.Tensor, grouped: bool):
        self.grouped = grouped
        self.offs = counts.cumsum(0, dtype=torch.int32) if grouped else None
        self.sizes = None if grouped else counts.tolist()

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [S, K], b [E, K, N] -> [S, N]: the rows of expert e times b[e]."""
        if self.grouped:
            return _grouped_mm(a, b, offs=self.offs)
        out = [rows @ b[e] for e, rows in enumerate(a.split(self.sizes)) if rows.shape[0]]
        return torch.cat(out) if out else a.new_zeros(0, b.shape[-1])

    def mm_t(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a [S, M], b [S, N] -> [E, M, N]: the per-expert sums of outer products a_p^T b_p (a weight gradient)."""
        if self.grouped:
            return _grouped_mm(a.t(), b, offs=self.offs)
        out = a.new_zeros(len(self.sizes), a.shape[1], b.shape[1])
        for e, (ra, rb) in enumerate(zip(a.split(self.sizes), b.split(self.sizes))):
            if ra.shape[0]:
                out[e] = ra.t() @ rb
        return out


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward(h: torch.Tensor, d_act: torch.Tensor) -> torch.Tensor:
    """d(silu(gate) * up) / d[gate, up], computed in fp32, in h's dtype."""
    gate, up = h.float().chunk(2, dim=-1)
    d_act = d_act.float()
    sig = torch.sigmoid(gate)
    d_up = d_act * gate * sig
    d_gate = d_act * up * sig * (1 + gate * (1 - sig))
    return torch.cat((d_gate, d_up), dim=-1).to(h.dtype)


class _RoutedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, order, counts, gate_up, down, grouped: bool):
        T, k = weights.shape
        groups = _Groups(counts, grouped)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        h = groups.mm(x[order // k], gate_up.transpose(-2, -1))
        o = groups.mm(_swiglu(h), down.transpose(-2, -1))
        per_slot = o[inverse].view(T, k, -1)  # back to (token, slot) by a gather: no scatter-add
        if torch.compiler.is_compiling():  # one fused fp32 pass: gather, weight, sum of the k slots, one rounding
            y = (per_slot.float() * weights[..., None]).sum(1).to(o.dtype)
        else:  # eager: a [k]-wide bmm (fp32 accumulate) instead of an fp32 [T, k, H] temporary
            y = torch.bmm(weights.to(per_slot.dtype).unsqueeze(1), per_slot).squeeze(1)
        ctx.save_for_backward(x, weights, order, inverse, counts, h, gate_up, down)
        ctx.grouped = grouped  # plain values only on ctx: torch.compile traces this function
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weights, order, inverse, counts, h, gate_up, down = ctx.saved_tensors
        groups, (T, k) = _Groups(counts, ctx.grouped), weights.shape
        src = order // k
        act = _swiglu(h)
        w_sorted = weights.reshape(-1)[order]  # the weight of each sorted pair, fp32
        dy_sorted = dy[src]
        g = groups.mm(dy_sorted, down)  # [S, I]: d(o)/d(a) applied to the token's dy, before the weight
        g32, act32 = g.float(), act.float()
        d_weights = (g32 * act32).sum(-1)[inverse].view(T, k).to(weights.dtype)
        d_act = (g32 * w_sorted[:, None]).to(h.dtype)
        d_down = groups.mm_t(dy_sorted, (act32 * w_sorted[:, None]).to(act.dtype))
        del g, g32, act, act32, dy_sorted
        dh = _swiglu_backward(h, d_act)
        d_gate_up = groups.mm_t(dh, x[src])
        dx_sorted = groups.mm(dh, gate_up)  # [S, H]
        dx = dx_sorted[inverse].view(T, k, -1).sum(1, dtype=torch.float32).to(x.dtype)
        return dx, d_weights, None, None, d_gate_up, d_down, None


def routed_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x [T, H] through the experts ``idx`` [T, k] chose with ``weights`` [T, k] -> [T, H]. ``gate_up`` [E, 2I, H],
    ``down`` [E, H, I] (the fused HF v5 layout)."""
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)  # position in the sorted buffer -> (token, slot) pair
    counts = torch.zeros(gate_up.shape[0], dtype=torch.int64, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )  # fixed-size (unlike bincount), so torch.compile sees static shapes
    return _RoutedExperts.apply(x, weights, order, counts, gate_up, down, uses_grouped_mm(x, backend))
