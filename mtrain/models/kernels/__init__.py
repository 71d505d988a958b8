"""Triton kernels of the rollout engine (CUDA only; :mod:`mtrain.models.ops` dispatches to them and holds the torch
versions the CPU runs).

Every kernel here computes a row's (a token's) result from that row's data alone, with one configuration chosen from
the weight's shape, never from the number of rows: no split-K, no reduction whose order depends on how many rows
share the launch. So a token's numbers do not depend on the batch it is computed in, nor on whether it is computed in
a prefill, a decode step or the trainer's recompute -- the property the engine's exact mode needs.

* :mod:`.attention`: attention of each token over its own cache row (``rows``, ``lens``), keys in fixed blocks;
* :mod:`.gemm`: ``x @ w.T (+ b)`` in fixed tiles (bf16 with fp32 accumulation; fp32 in full IEEE precision);
* :mod:`.experts`: the routed experts as fixed-tile grouped GEMMs (gate/up + SwiGLU, down) and a fixed-order
  weighted sum of each token's k expert outputs;
* :mod:`.rowwise`: RMSNorm, the log-probability of a chosen token, and Gumbel-max sampling with counter-based noise
  (a function of seed, request row and step: the same draw whatever the batch).
"""

from mtrain._lazy import lazy_exports

# imported on first use (triton loads only when a CUDA tensor asks for a kernel)
_EXPORTS = {
    "attention_supported": "attention",
    "cache_attention": "attention",
    "matmul": "gemm",
    "routed_experts": "experts",
    "rms_norm": "rowwise",
    "logprob": "rowwise",
    "sample": "rowwise",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
