"""The ops whose numerics the rollout engine's exact mode pins down, and the switch that pins them.

Outside :func:`invariant` every op here is the plain torch call the model always made (``F.linear``, the HF RMSNorm,
``topk``, the grouped-GEMM experts): training, eval and HF parity are untouched. Inside it, each op computes a row's
result from that row alone, in an order that does not depend on how many rows share the call:

* on CUDA through the Triton kernels of :mod:`mtrain.models.kernels` (fixed tiles, no split-K, one program per row);
* on the CPU by torch in fixed shapes: matmuls in blocks of :data:`CPU_ROWS` rows (every block the same GEMM),
  experts one at a time, reductions over the last dim row by row.

Top-k picks by a stable sort (ties to the lowest expert id); the k-slot sums (Qwen's renormalisation, the experts'
combine) add the slots left to right. Exact mode is eager (no ``torch.compile``: a fused kernel keeps other
intermediates) and inference only (no autograd through the invariant kernels).

Sampling and token logprobs are here too (:func:`sample`, :func:`logprob`): every engine and the trainer's scoring
share them, so a token drawn by one engine is the token another draws from the same logits.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

from . import kernels

CPU_ROWS = 16  # the CPU's invariant matmul multiplies blocks of this many rows
# In exact mode on the CPU every forward runs on a multiple of this many tokens (padding tokens added): torch's CPU
# element-wise kernels compute a tensor's tail (its last size % SIMD-width elements) with scalar code, whose exp/silu/
# cos can differ from the vector code by an ulp, so a token's numbers would depend on where it falls in the batch.
CPU_TOKENS = 32
_invariant = False
_fused = False


def invariant_active() -> bool:
    return _invariant


@contextlib.contextmanager
def fused(on: bool = True) -> Iterator[None]:
    """Inference on CUDA with mtrain's own kernels where they beat the torch calls: RMSNorm in one kernel, the routed
    experts as Triton grouped GEMMs (no autograd; the rollout engine's decode and prefill). Off: plain torch."""
    global _fused
    before, _fused = _fused, on
    try:
        yield
    finally:
        _fused = before


@contextlib.contextmanager
def invariant(on: bool = True) -> Iterator[None]:
    """Run the ops of the block batch-invariantly (``on``) or as usual."""
    global _invariant
    before, _invariant = _invariant, on
    try:
        yield
    finally:
        _invariant = before


def _triton_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


# -- matmul -----------------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; batch-invariant inside :func:`invariant`."""
    if not _invariant:
        return F.linear(x, weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if _triton_ok(x):
        y = kernels.matmul(x2, weight, bias)
    else:
        y = _blocked_linear(x2, weight, bias)
    return y.view(*shape[:-1], weight.shape[0])


def _blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep_pad: bool = False
                    ) -> torch.Tensor:
    """[M, K] @ [N, K].T as ceil(M / CPU_ROWS) GEMMs of exactly CPU_ROWS rows each (the last one zero-padded).
    ``keep_pad``: return the padded rows too (whole blocks for the element-wise ops after it)."""
    M, K = x.shape
    blocks = -(-M // CPU_ROWS)
    padded = x.new_zeros(blocks * CPU_ROWS, K)
    padded[:M] = x
    # bmm (not matmul, which would fold the blocks into one GEMM): every block is its own CPU_ROWS x K product
    y = torch.bmm(padded.view(blocks, CPU_ROWS, K), weight.t().expand(blocks, K, weight.shape[0]))
    if bias is not None:
        y = y + bias
    y = y.reshape(blocks * CPU_ROWS, -1)
    return y if keep_pad else y[:M]


# -- row-wise -----------------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, computed in fp32 (the HF order)."""
    if (_invariant or _fused) and _triton_ok(x):
        return kernels.rms_norm(x, weight, eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def topk(x: torch.Tensor, k: int, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k)``; inside :func:`invariant` by a stable descending sort (ties to the lowest index)."""
    if not _invariant:
        return x.topk(k, dim=-1, sorted=sorted)
    values, indices = x.sort(dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def slot_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-1, keepdim=True)`` over a few slots; inside :func:`invariant` left to right."""
    if not _invariant:
        return x.sum(dim=-1, keepdim=True)
    total = x[..., :1]
    for j in range(1, x.shape[-1]):
        total = total + x[..., j : j + 1]
    return total


# -- experts ------------------------------------------------------------------------------------------------------------
def experts_kernel_ok(x: torch.Tensor) -> bool:
    """Whether :func:`experts_invariant` may serve the experts: always in exact mode, and in :func:`fused` inference
    on CUDA in bf16/fp16 (the Triton grouped GEMMs)."""
    return _invariant or (_fused and _triton_ok(x) and x.dtype != torch.float32)


def experts_invariant(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """The routed experts (x [T, H], weights fp32 [T, k], ids [T, k]) batch-invariantly, without autograd."""
    if _triton_ok(x) and x.dtype != torch.float32:
        return kernels.routed_experts(x, weights, idx, gate_up, down)
    T, k = idx.shape
    out = x.new_zeros(T * k, x.shape[1])
    flat = idx.reshape(-1)
    token = torch.arange(T * k, device=x.device) // k
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        h = _blocked_linear(x[token[pairs]], gate_up[e], None, keep_pad=True)  # whole blocks: no element-wise tail
        gate, up = h.chunk(2, dim=-1)
        out[pairs] = _blocked_linear(F.silu(gate) * up, down[e], None)[: pairs.numel()]
    per_slot = out.view(T, k, -1).float() * weights.float()[..., None]
    y = per_slot[:, 0]
    for j in range(1, k):
        y = y + per_slot[:, j]
    return y.to(x.dtype)


# -- token logprobs and sampling ------------------------------------------------------------------------------------------
def logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 ``log_softmax(logits / T)[token]`` per row of ``logits [R, V]`` (0 where token < 0)."""
    if logits.is_cuda:
        return kernels.logprob(logits, tokens, temperature)
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    lp = x.log_softmax(-1).gather(-1, tokens.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(tokens >= 0, lp, torch.zeros_like(lp))


_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values kept below 2^32 in int64: no overflow anywhere)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK
    return x ^ (x >> 16)


def noise_keys(seed: int | torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The noise key of (seed, request row, step): int64 [R] below 2^32. ``seed`` may be a 0-dim device tensor."""
    s = torch.as_tensor(seed, dtype=torch.int64, device=rows.device) & _MASK
    k = _mix(s ^ 0x2545F491)
    k = _mix(k ^ (rows.long() & _MASK))
    return _mix(k ^ (steps.long() & _MASK))


def sample(logits: torch.Tensor, temperature: float, top_p: float, keys: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits [R, V]``: argmax at temperature 0; else Gumbel-max over ``logits / T`` restricted
    to the top-p nucleus (the smallest set of most likely tokens whose mass reaches ``top_p``), the Gumbel noise a
    hash of (``keys[r]``, token id). A row's draw depends on its logits and key only, not on the batch; ties go to the
    lowest token id. No host sync (CUDA-graph safe)."""
    R, V = logits.shape
    threshold = nucleus_threshold(logits, temperature, top_p)
    if logits.is_cuda:
        return kernels.sample(logits, keys, threshold, temperature)
    x = logits.float()
    if temperature <= 0:
        return x.argmax(-1)
    vocab = torch.arange(V, device=logits.device, dtype=torch.int64)
    h = _mix(keys[:, None] ^ ((vocab[None, :] * 0x9E3779B1) & _MASK))
    u = uniform(h)
    score = torch.where(x >= threshold[:, None], x / temperature - torch.log(-torch.log(u)), float("-inf"))
    return score.argmax(-1)


def nucleus_threshold(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[R] the smallest fp32 logit a token may have to be in its row's top-p nucleus (-inf: every token). On the
    unscaled logits, the values the GPU kernel compares too (a threshold on logits / T could sit an ulp above the
    last kept token's own scaled value there). A token stays while the mass before it is below ``top_p`` (HF's and
    vLLM's boundary); the first always stays, and tokens whose logit equals the last kept one's stay too."""
    if not (temperature > 0 and top_p < 1.0):
        return torch.full((logits.shape[0],), float("-inf"), device=logits.device)
    ordered = logits.float().sort(dim=-1, descending=True).values
    probs = (ordered / temperature).softmax(-1)
    keep = ((probs.cumsum(-1) - probs) < top_p).sum(-1, keepdim=True).clamp(min=1)
    return ordered.gather(-1, keep - 1).squeeze(-1)


def uniform(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash -> fp32 uniform in (0, 1), both ends excluded: 23 bits, (k + 0.5) / 2^23. (24 bits would round
    the top value to 1.0 in fp32, whose Gumbel noise is +inf: that token would win whatever its logit.)"""
    return ((h >> 9).float() + 0.5) * (1.0 / 8388608.0)
