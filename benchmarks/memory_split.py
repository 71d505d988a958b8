"""Where a training step's peak memory goes: mtrain (compiled layers) against transformers + Liger kernels, one GPU.

    python benchmarks/memory_split.py            # Qwen3-30B-A3B shape, 4 layers, 4 x 2048 tokens, bf16, rl=on
    python benchmarks/memory_split.py --chunks 4096 1024 512   # mtrain at several loss-chunk sizes, with tokens/s
    python benchmarks/memory_split.py --tensors  # also: what each side saves for the backward, by module and shape

For each model, after warm-up steps: the weights (allocated before the step, gradients freed), what the forward
pass leaves saved for the backward (allocated right after the loss), the peak during the forward, and the peak of
the whole step (forward + backward). The difference between the two models' rows says whether the gap is in saved
activations or in a transient of the backward. Appends one row to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_results, batch, card, make_hf, make_mtrain, mtrain_config, time_cuda  # noqa: E402

GIB = 2**30


def split(model, loss_fn, ids, targets, warmup: int = 2) -> dict:
    for _ in range(warmup):
        model.zero_grad(set_to_none=True)
        loss_fn(model, ids, targets).backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    loss = loss_fn(model, ids, targets)
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - weights
    fwd_peak = torch.cuda.max_memory_allocated()
    loss.backward()
    torch.cuda.synchronize()
    return {"weights_gib": round(weights / GIB, 2), "saved_for_backward_gib": round(saved / GIB, 2),
            "forward_peak_gib": round(fwd_peak / GIB, 2), "step_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}


def saved_tensors(model, loss_fn, ids, targets, top: int = 14) -> list[dict]:
    """One forward (eager) under a saved-tensors hook: every tensor autograd keeps for the backward, counted once per
    storage (views share one), parameters left out, grouped by the innermost module that saved it (layer numbers
    folded to ``*``) and by shape and dtype. Returns the ``top`` largest groups, largest first."""
    import collections
    import re

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack, seen = ["(top)"], set()
    groups: dict = collections.defaultdict(lambda: [0, 0])

    def push(name):
        return lambda *_: stack.append(name)

    def pop(*_):
        stack.pop()

    handles = []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(push(re.sub(r"\.\d+\.", ".*.", name))))
            handles.append(mod.register_forward_hook(pop))

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            g = groups[(stack[-1], tuple(t.shape), str(t.dtype).replace("torch.", ""))]
            g[0] += 1
            g[1] += storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, ids, targets)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    rows = sorted(({"module": m, "shape": list(sh), "dtype": dt, "count": c, "gib": round(b / GIB, 3)}
                   for (m, sh, dt), (c, b) in groups.items()), key=lambda r: -r["gib"])
    total = round(sum(b for _, b in groups.values()) / GIB, 3)
    return [{"module": "(all)", "gib": total}] + rows[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, nargs="*", default=[2048], help="mtrain loss-chunk sizes (tokens) to measure")
    p.add_argument("--tensors", action="store_true", help="also list what each side saves for the backward (eager)")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, plain transformers: checks the script")
    a = p.parse_args()
    if a.smoke:
        device, shape, tokens = "cpu", "tiny_qwen", (2, 64)
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --smoke)"
        device, shape, tokens = "cuda", "qwen3_30b_a3b", (4, 2048)
    cfg = mtrain_config(shape, 4)
    ids, targets = batch(cfg, *tokens, device)
    rows, tensors = {}, {}
    model = make_mtrain(cfg, device, rl=True).train()
    if a.tensors:
        tensors["mtrain, eager"] = saved_tensors(model, lambda m, i, t: m.loss(i, t), ids, targets)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    if not a.smoke:
        model.compile_layers()
        for chunk in a.chunks:
            def loss(m, i, t, chunk=chunk):
                return m.loss(i, t, chunk_size=chunk)

            def step(loss=loss):
                model.zero_grad(set_to_none=True)
                loss(model, ids, targets).backward()

            rows[f"mtrain compiled, chunk {chunk}"] = split(model, loss, ids, targets) | {
                "tok_s": round(ids.numel() / time_cuda(step, warmup=2, iters=8))}
    del model
    torch.cuda.empty_cache() if device == "cuda" else None

    def hf_loss(m, i, t):
        return m(input_ids=i, labels=i, use_cache=False).loss

    name = "transformers"
    if not a.smoke:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe

        apply_liger_kernel_to_qwen3_moe()
        name = "transformers + Liger"
    hf = make_hf(cfg, device, state, dtype=torch.bfloat16 if device == "cuda" else torch.float32).train()
    if not a.smoke:
        rows[name] = split(hf, hf_loss, ids, targets)
    if a.tensors:
        tensors[name] = saved_tensors(hf, hf_loss, ids, targets)
    for side, groups in tensors.items():
        print(f"\nsaved for the backward, {side} (GiB; largest groups):")
        for g in groups:
            print(f"  {g['gib']:7.3f}  {g.get('count', ''):>3}  {g['module']:40} {g.get('shape', '')} {g.get('dtype', '')}")
    for name, r in rows.items():
        print(f"{name:28} " + "  ".join(f"{k} {v:,}" for k, v in r.items()), flush=True)
    if not a.smoke:
        append_results([{"bench": "memory_split", "shape": shape, "layers": 4, "tokens": "4x2048", "rl": True,
                         "card": card(), **{f"{n}: {k}": v for n, r in rows.items() for k, v in r.items()},
                         **({"saved_tensors": tensors} if tensors else {})}])


if __name__ == "__main__":
    main()
