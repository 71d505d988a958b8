"""Where a training step's peak memory goes: mtrain (compiled layers) against transformers + Liger kernels, one GPU.

    python benchmarks/memory_split.py            # Qwen3-30B-A3B shape, 4 layers, 4 x 2048 tokens, bf16, rl=on
    python benchmarks/memory_split.py --chunks 4096 1024 512   # mtrain at several loss-chunk sizes, with tokens/s

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, nargs="*", default=[4096], help="mtrain loss-chunk sizes (tokens) to measure")
    a = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    cfg = mtrain_config("qwen3_30b_a3b", 4)
    ids, targets = batch(cfg, 4, 2048, "cuda")
    rows = {}
    model = make_mtrain(cfg, "cuda", rl=True).train()
    model.compile_layers()
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    for chunk in a.chunks:
        def loss(m, i, t, chunk=chunk):
            return m.loss(i, t, chunk_size=chunk)

        def step(loss=loss):
            model.zero_grad(set_to_none=True)
            loss(model, ids, targets).backward()

        rows[f"mtrain compiled, chunk {chunk}"] = split(model, loss, ids, targets) | {
            "tok_s": round(ids.numel() / time_cuda(step, warmup=2, iters=8))}
    del model
    torch.cuda.empty_cache()

    def hf_loss(m, i, t):
        return m(input_ids=i, labels=i, use_cache=False).loss

    from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe

    apply_liger_kernel_to_qwen3_moe()
    hf = make_hf(cfg, "cuda", state).train()
    rows["transformers + Liger"] = split(hf, hf_loss, ids, targets)
    for name, r in rows.items():
        print(f"{name:28} " + "  ".join(f"{k} {v:,}" for k, v in r.items()), flush=True)
    append_results([{"bench": "memory_split", "shape": "qwen3_30b_a3b", "layers": 4, "tokens": "4x2048", "rl": True,
                     "card": card(), **{f"{n}: {k}": v for n, r in rows.items() for k, v in r.items()}}])


if __name__ == "__main__":
    main()
