"""What the optimizer side of a training step costs on the GPU: gradient clipping and AdamW (fused and foreach), each
timed alone after one fwd+bwd of the Qwen3-30B-A3B shape (4 layers, bf16, rl=on), 10 iterations after 3 warm-ups.

    python benchmarks/optimizer_step.py

(The 2026-11-29 row in results.jsonl, ``optimizer_probe``, came from this code run ad hoc; the bare loop of
``sft_cli.py`` spends about 29 ms a step beyond fwd+bwd, and this splits it.)
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import batch, make_mtrain, mtrain_config  # noqa: E402
from mtrain.lit.clipping import clip_in_fused_step  # noqa: E402
from mtrain.lit.optim import param_groups  # noqa: E402


def ms(fn, iters: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    cfg = mtrain_config("qwen3_30b_a3b", 4)
    model = make_mtrain(cfg, "cuda", rl=True).train()
    ids, targets = batch(cfg, 4, 2048, "cuda")
    model.loss(ids, targets).backward()
    params = list(model.parameters())
    print(f"{sum(p.numel() for p in params) / 1e9:.2f}B parameters in {len(params)} tensors, "
          f"{sum(p.grad.numel() * p.grad.element_size() for p in params) / 1e9:.2f} GB of gradients")
    grads = [p.grad for p in params]
    print(f"clip_grad_norm_: {ms(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)):.1f} ms")
    # its two passes apart, and other ways to the same total norm
    print(f"  _foreach_norm: {ms(lambda: torch._foreach_norm(grads)):.1f} ms")
    scale = torch.ones((), device="cuda")
    print(f"  _foreach_mul_: {ms(lambda: torch._foreach_mul_(grads, scale)):.1f} ms")
    print(f"  per-tensor vector_norm (fp32 accumulate): "
          f"{ms(lambda: torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).norm()):.1f} ms")
    by_size = sorted(((g.numel() * g.element_size() / 1e9, tuple(g.shape), str(g.dtype)) for g in grads), reverse=True)
    print(f"  largest gradients (GB, shape, dtype): {by_size[:4]}")
    for gb, shape, dtype in by_size[:2]:
        g = next(x for x in grads if tuple(x.shape) == shape)
        t = ms(lambda: torch._foreach_norm([g]))
        print(f"  _foreach_norm of one {shape} {dtype}: {t:.2f} ms = {gb / t * 1e3:.0f} GB/s read")
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5, fused=True)
    saved = [p.grad.clone() for p in params]

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def folded():
        clip_in_fused_step(opt, params, 1.0)
        opt.step()

    for name, fn in (("clip_grad_norm_ + fused AdamW", clip_then_step), ("clip folded into fused AdamW", folded)):
        print(f"{name}: {ms(fn):.1f} ms")  # gradients shrink a little each call: the timing does not care
        for p, g in zip(params, saved):
            p.grad.copy_(g)
    del opt
    for fused in (True, False):
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-5, **({"fused": True} if fused else {"foreach": True}))
        print(f"AdamW {'fused' if fused else 'foreach'}: {ms(opt.step):.1f} ms")
        del opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
