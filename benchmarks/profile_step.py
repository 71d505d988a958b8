"""Where a training step's GPU time goes: mtrain (compiled layers) and transformers (eager, grouped_mm), one GPU.

    python benchmarks/profile_step.py                      # GLM-4.5-Air shape, 4 layers, 4 x 2048 tokens, bf16, rl=on
    python benchmarks/profile_step.py --shape qwen3_30b_a3b
    python benchmarks/profile_step.py --ops                # also every GEMM by op, input shapes and kernel

``torch.profiler`` over a few fwd+bwd steps after warm-up; every CUDA kernel's time is summed into a category by
its name (attention, expert grouped GEMMs, other GEMMs, compiled fused kernels, copies/indexing, the rest) and
printed per step, with the step's wall time between CUDA events (the gap is time the GPU waited for the host) and
the largest kernels, so the categories can be checked by eye. Appends one row to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    append_results, batch, card, hf_step, make_hf, make_mtrain, mtrain_config, ours_step, time_cuda,
)

# first match wins; names are lower-cased kernel names
CATEGORIES = [
    ("compiled fused (triton)", ("triton",)),  # first: inductor names fused kernels after their ops (_grouped_mm, ...)
    ("collective (NCCL)", ("nccl",)),
    ("optimizer (fused AdamW)", ("adam",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("expert grouped GEMM", ("grouped", "groupproblemshape", "ptrarray", "group_gemm", "groupgemm")),
    ("other GEMM", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "sm90_")),
    ("copy / index / sort", ("copy", "memcpy", "memset", "index", "gather", "scatter", "sort", "radix", "cat", "fill")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other elementwise / reduce"


def profile(step, steps: int, host: bool = False) -> dict:
    """Kernel time per category and the largest kernels, per step (ms), over ``steps`` profiled steps; ``host``: also
    the host ops that took the most CPU time themselves (all threads: the autograd engine runs the backward's)."""
    step_s = time_cuda(step, warmup=3, iters=steps)
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if host else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = collections.defaultdict(float)
    seen = set()  # with CPU activity on, a kernel is listed under its launching op too: count each once
    for e in prof.events():
        span = (e.name, e.time_range.start, e.time_range.end)
        if e.device_type == torch.autograd.DeviceType.CUDA and span not in seen:
            seen.add(span)
            per_kernel[e.name] += e.time_range.elapsed_us() / 1e3 / steps  # the kernel itself; us -> ms, per step
    cats: dict[str, float] = collections.defaultdict(float)
    for name, ms in per_kernel.items():
        cats[category(name)] += ms
    busy = sum(cats.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    out = {}
    if host:
        cpu = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        out["host_self_ms"] = round(sum(e.self_cpu_time_total for e in cpu) / 1e3 / steps, 2)
        out["host_top_ms"] = [(e.key[:80], round(e.self_cpu_time_total / 1e3 / steps, 2), e.count // steps)
                              for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:15]]
    return out | {"step_ms": round(step_s * 1e3, 2), "kernel_ms": round(busy, 2),
            "categories_ms": {c: round(v, 2) for c, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [(category(n), n[:200], round(v, 2)) for n, v in top]}


GEMM_CATEGORIES = ("other GEMM", "expert grouped GEMM")


def gemm_ops(step, steps: int, top: int = 40) -> list:
    """GPU time of every GEMM kernel per step (ms), keyed by the op that launched it, its input shapes and the kernel
    name (which names the layout cuBLAS/CUTLASS chose): the same product can run at different speeds on each side."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    ops: dict[tuple, list] = {}
    for e in prof.events():
        for k in getattr(e, "kernels", []):
            if category(k.name) in GEMM_CATEGORIES:
                key = (e.name, str(e.input_shapes), k.name[:90])
                agg = ops.setdefault(key, [0.0, 0])
                agg[0] += k.duration / 1e3 / steps  # us -> ms, per step
                agg[1] += 1
    rows = [{"op": op, "shapes": shp, "kernel": kern, "ms": round(ms, 3), "calls_per_step": n // steps}
            for (op, shp, kern), (ms, n) in ops.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="glm45_air")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--ops", action="store_true", help="also list every GEMM by op, shapes and kernel")
    a = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    cfg = mtrain_config(a.shape, a.layers)
    ids, targets = batch(cfg, 4, 2048, "cuda")
    model = make_mtrain(cfg, "cuda", rl=True).train()
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    model.compile_layers()

    def ours():
        model.zero_grad(set_to_none=True)
        ours_step(model, ids, targets)

    rows = {"mtrain rl=on, compiled layers": profile(ours, a.steps)}
    if a.ops:
        rows["mtrain rl=on, compiled layers"]["gemms"] = gemm_ops(ours, 2)
    del model
    torch.cuda.empty_cache()
    hf = make_hf(cfg, "cuda", state).train()

    def ref():
        hf.zero_grad(set_to_none=True)
        hf_step(hf, ids, targets)

    rows["transformers eager (grouped_mm)"] = profile(ref, a.steps)
    if a.ops:
        rows["transformers eager (grouped_mm)"]["gemms"] = gemm_ops(ref, 2)
    for side, r in rows.items():
        print(f"\n{side}: step {r['step_ms']} ms, kernels {r['kernel_ms']} ms "
              f"({r['step_ms'] - r['kernel_ms']:.1f} ms the GPU waited)")
        for c, ms in r["categories_ms"].items():
            print(f"  {ms:8.2f} ms  {100 * ms / r['kernel_ms']:5.1f}%  {c}")
        print("  largest kernels:")
        for cat, n, ms in r["top_kernels_ms"]:
            print(f"  {ms:8.2f} ms  [{cat}] {n[:150]}")
        if "gemms" in r:
            print("  GEMMs by op, input shapes, kernel (ms per step, calls per step):")
            for g in r["gemms"]:
                print(f"  {g['ms']:8.3f} ms x{g['calls_per_step']:<3} {g['op']:<18} {g['shapes'][:70]:<70} "
                      f"{g['kernel'][:60]}")
    append_results([{"bench": "profile_step_ops" if a.ops else "profile_step", "shape": a.shape, "layers": a.layers,
                     "tokens": "4x2048", "rl": True, "card": card(), **rows}])


if __name__ == "__main__":
    main()
