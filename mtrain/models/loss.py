"""Chunked linear + cross-entropy that never materialises the full [tokens, vocab] logits.

The forward pass walks over token chunks: logits of one chunk (model dtype GEMM, fp32 softmax), its loss, and --
when gradients are needed -- its gradients w.r.t. the hidden states and the output weight, which are stored for the
backward pass. Peak extra memory is one chunk of logits and their gradient plus the weight gradient, instead of the
full fp32 logits and their gradient (for Qwen3's 151,936-token vocabulary, 8k tokens: 5 GB -> 1.2 GB at chunk 2k).
The weight gradient accumulates in the weight's dtype: the first chunk's GEMM writes it, each later one adds to it
(``addmm_``: the GEMM sums in fp32 and rounds once per chunk; bf16: 0.6 GB kept for the backward at Qwen3's
vocabulary, where an fp32 accumulator kept 1.2 GB).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _chunk_loss_and_grad(logits: torch.Tensor, tgt: torch.Tensor, need_grad: bool):
    """One chunk: fp32 softmax cross-entropy summed over valid targets, and d(sum)/d(logits) in the logits' dtype.
    Written as one expression chain so that ``torch.compile`` fuses it into a pass or two over the chunk."""
    x = logits.float()
    lse = x.logsumexp(dim=-1, keepdim=True)
    valid = (tgt != IGNORE_INDEX)[:, None]
    tgt = tgt.clamp(min=0)[:, None]
    loss = ((lse - x.gather(1, tgt)) * valid).sum()
    if not need_grad:
        return loss, None
    is_target = torch.arange(x.shape[1], device=x.device)[None, :] == tgt
    grad = ((x - lse).exp() - is_target.float()) * valid
    return loss, grad.to(logits.dtype)


_compiled_chunk = None


def _chunk_fn(device: torch.device):
    """The fused (compiled) chunk function on CUDA; plain eager elsewhere."""
    global _compiled_chunk
    if device.type != "cuda":
        return _chunk_loss_and_grad
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_grad, dynamic=False)
    return _compiled_chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk_fn = _chunk_fn(h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = (torch.empty_like(w) if h.shape[0] else torch.zeros_like(w)) if need_w else None  # no chunk: 0
        for start in range(0, h.shape[0], chunk_size):
            hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
            loss, grad = chunk_fn(hc @ w.t(), tc, need_h or need_w)
            total += loss
            if need_h:
                grad_h[start : start + chunk_size] = grad @ w
            if need_w and start == 0:
                torch.mm(grad.t(), hc, out=grad_w)  # the first chunk writes: no zero fill, no read of the buffer
            elif need_w:
                grad_w.addmm_(grad.t(), hc)  # fp32 inside the GEMM, one rounding per chunk
        ctx.save_for_backward(grad_h, grad_w)
        return total, (targets != IGNORE_INDEX).sum()

    @staticmethod
    def backward(ctx, grad_total, _grad_count):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_total.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None


def linear_cross_entropy(
    h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """h [N, hidden], w [V, hidden], targets [N] (-100 = ignore) -> (summed fp32 loss, number of counted tokens)."""
    return _LinearCrossEntropy.apply(h, w, targets, chunk_size)
