"""mtrain vs transformers (grouped_mm experts, SDPA), eager and torch.compile'd, side by side on one GPU: training
step (fwd+bwd) and eval forward, identical random weights, same shapes and dtype (bf16).

    python benchmarks/train_step.py                       # Qwen3-30B-A3B and GLM-4.5-Air shapes, 4 layers, 4x2048
    python benchmarks/train_step.py --eval-layers 48      # + eval forward of a full-depth Qwen3-30B-A3B shape

Checks numerics first and stops when they fail (mtrain's logits, loss and gradient errors against an fp32 reference
must be no larger than transformers' own bf16 errors, with a margin), then prints tokens/s, TFLOP/s, MFU, peak memory
and the ratios to transformers eager and compiled, for rl=on and rl=off, and to transformers + Liger kernels (eager;
``--liger``: what a user adds with one call, ``apply_liger_kernel_to_<family>()``; run last, since Liger patches
transformers' modules in place; a family Liger has no patch for is skipped with a note). MFU is the project's one definition: model
FLOPs (``mtrain.models.flops``) over the card's dense bf16 spec peak (989 TFLOP/s on H100/H200); the dense matmul rate
measured in the same run is printed beside it. Appends one JSON line per case to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    append_results, batch, card, flops_per_token, hf_step, make_hf, make_mtrain, matmul_tflops, mtrain_config,
    ours_step, spec_peak_tflops, time_cuda,
)


def free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def _loss_and_grads(model, ids, targets, ours: bool):
    model.zero_grad(set_to_none=True)
    loss = model.loss(ids, targets) if ours else model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def check_numerics(shape: str, args) -> dict:
    """Same weights at 2 layers: mtrain bf16 and transformers bf16, each against an fp32 reference (transformers in
    fp32 with the same weights). bf16 gradients of large reductions are noisy on both sides: the fair statement is
    that mtrain's errors are no larger than the reference's."""
    cfg = mtrain_config(shape, 2)
    ours = make_mtrain(cfg, "cuda", rl=True)
    sd = ours.state_dict()
    ids, targets = batch(cfg, 2, 512, "cuda")
    out = {}
    ref32 = make_hf(cfg, "cuda", sd, dtype=torch.float32)
    with torch.no_grad():
        logits32 = ref32(input_ids=ids).logits.float()
    loss32, grads32 = _loss_and_grads(ref32, ids, targets, ours=False)
    del ref32
    free()
    with torch.no_grad():
        out["logits_err_mtrain"] = rel(ours(ids), logits32)
    loss, grads = _loss_and_grads(ours, ids, targets, ours=True)
    out["loss_err_mtrain"] = abs(loss - loss32)
    errs = {n: rel(g, grads32[n]) for n, g in grads.items()}
    out["grad_err_mtrain_median"] = sorted(errs.values())[len(errs) // 2]
    out["grad_err_mtrain_max"] = max(errs.values())
    del ours, grads
    free()
    hf = make_hf(cfg, "cuda", sd)
    with torch.no_grad():
        out["logits_err_ref"] = rel(hf(input_ids=ids).logits, logits32)
    loss, grads = _loss_and_grads(hf, ids, targets, ours=False)
    out["loss_err_ref"] = abs(loss - loss32)
    errs = {n: rel(g, grads32[n]) for n, g in grads.items()}
    out["grad_err_ref_median"] = sorted(errs.values())[len(errs) // 2]
    out["grad_err_ref_max"] = max(errs.values())
    del hf, grads, grads32, sd
    free()
    return {k: float(f"{v:.3g}") for k, v in out.items()}


# mtrain's bf16 error may exceed transformers' by this factor (plus a floor for errors near zero) before the run stops
# (mtrain key, transformers key, factor, floor)
NUMERICS_MARGIN = [("logits_err_mtrain", "logits_err_ref", 1.5, 1e-3), ("loss_err_mtrain", "loss_err_ref", 2.0, 1e-2),
                   ("grad_err_mtrain_median", "grad_err_ref_median", 1.5, 1e-2)]


def numerics_failures(num: dict) -> list[str]:
    return [f"{ours}: {num[ours]:.3g} > max({factor} x {ref} {num[ref]:.3g}, {floor})"
            for ours, ref, factor, floor in NUMERICS_MARGIN if num[ours] > max(factor * num[ref], floor)]


def train_tokens_per_s(model, step, ids, targets) -> tuple[float, float]:
    def run():
        model.zero_grad(set_to_none=True)
        step(model, ids, targets)

    free()
    t = time_cuda(run, warmup=args.warmup, iters=args.iters)
    return ids.numel() / t, torch.cuda.max_memory_allocated() / 2**30


def hf_reference(cfg, state, ids, targets, compiled: bool):
    """transformers' training tokens/s and peak GiB, eager or torch.compile'd (None and the reason when compiling
    fails)."""
    hf = make_hf(cfg, "cuda", state).train()
    try:
        if compiled:
            hf = torch.compile(hf)
        return train_tokens_per_s(hf, hf_step, ids, targets), None
    except Exception as e:  # noqa: BLE001  (a compile failure is a result: recorded, the eager ratio stands)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        del hf
        free()


# Liger's one-call patch per shape's family (liger-kernel 0.8.5 has none for GLM4-MoE)
LIGER_PATCH = {"qwen3_30b_a3b": "apply_liger_kernel_to_qwen3_moe", "glm45_air": "apply_liger_kernel_to_glm4_moe"}


def liger_reference(shape: str, cfg, state, ids, targets):
    """transformers + Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy: the patch's defaults), eager:
    tokens/s and peak GiB, or None and why (no patch for the family, not installed, or it failed)."""
    try:
        import liger_kernel
        import liger_kernel.transformers as lk
    except ImportError as e:
        return None, f"liger-kernel not installed ({e})"
    patch = getattr(lk, LIGER_PATCH.get(shape, ""), None)
    if patch is None:
        return None, f"liger-kernel {getattr(liger_kernel, '__version__', '')} has no patch for {shape}'s family".replace("  ", " ")
    try:
        patch()
        return hf_reference(cfg, state, ids, targets, compiled=False)[0], None
    except Exception as e:  # noqa: BLE001  (a failure is a result: recorded with its reason)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def bench_train(shape: str, args, peak_tflops: float, matmul: float) -> list[dict]:
    cfg = mtrain_config(shape, args.layers)
    ids, targets = batch(cfg, args.batch, args.seq, "cuda")
    fpt = flops_per_token(cfg, args.seq, train=True)
    results, state, refs, why = {}, None, {}, {}
    variants = [("rl=on", True, False), ("rl=off", False, False)]
    if args.compile:
        variants += [("rl=on+compile", True, True), ("rl=off+compile", False, True)]
    for name, rl, compiled in variants:
        model = make_mtrain(cfg, "cuda", rl=rl).train()
        if compiled:
            model.compile_layers()
        if state is None:
            state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        results[name] = train_tokens_per_s(model, ours_step, ids, targets)
        print(f"  {shape} mtrain {name}: {results[name][0]:,.0f} tok/s, peak {results[name][1]:.1f} GiB", flush=True)
        del model
        free()
        if "eager" not in refs:  # the reference right after the first variant, so a cut-off run still has its ratio
            refs["eager"], _ = hf_reference(cfg, state, ids, targets, compiled=False)
            print(f"  {shape} transformers grouped_mm: {refs['eager'][0]:,.0f} tok/s, peak {refs['eager'][1]:.1f} GiB",
                  flush=True)
    if args.compile:
        refs["compiled"], why["compiled"] = hf_reference(cfg, state, ids, targets, compiled=True)
        if refs["compiled"] is None:
            print(f"  {shape} transformers compiled: failed ({why['compiled']})", flush=True)
        else:
            print(f"  {shape} transformers compiled: {refs['compiled'][0]:,.0f} tok/s, peak {refs['compiled'][1]:.1f} "
                  "GiB", flush=True)
    if args.liger:
        refs["liger"], why["liger"] = liger_reference(shape, cfg, state, ids, targets)
        lr = refs["liger"]
        print(f"  {shape} transformers + Liger: " + (f"{lr[0]:,.0f} tok/s, peak {lr[1]:.1f} GiB" if lr
                                                       else f"skipped ({why['liger']})"), flush=True)
    ref, cref, lref = refs["eager"], refs.get("compiled"), refs.get("liger")
    rows = []
    for name, (tps, mem) in results.items():
        rows.append(dict(
            bench="train_step", shape=shape, layers=args.layers, tokens=f"{args.batch}x{args.seq}", variant=name,
            rl=name.startswith("rl=on"), mtrain_tok_s=round(tps), ref_tok_s=round(ref[0]), ratio=round(tps / ref[0], 3),
            ref_compiled_tok_s=round(cref[0]) if cref else None,
            ratio_vs_compiled=round(tps / cref[0], 3) if cref else None,
            ref_compiled_error=why.get("compiled"),
            mtrain_tflops=round(tps * fpt / 1e12, 1), mfu=round(tps * fpt / 1e12 / peak_tflops, 3),
            ref_mfu=round(ref[0] * fpt / 1e12 / peak_tflops, 3), peak_tflops_spec=peak_tflops,
            matmul_tflops_measured=round(matmul, 1), mtrain_peak_gib=round(mem, 2), ref_peak_gib=round(ref[1], 2),
            ref_compiled_peak_gib=round(cref[1], 2) if cref else None,
            liger_tok_s=round(lref[0]) if lref else None, ratio_vs_liger=round(tps / lref[0], 3) if lref else None,
            liger_peak_gib=round(lref[1], 2) if lref else None, liger_error=why.get("liger"),
        ))
    return rows


def bench_eval(shape: str, layers: int, args, peak_tflops: float) -> list[dict]:
    """Forward-only (no grad) logits, no KV cache on either side, identical weights (mtrain's, copied to the host
    and loaded into transformers), one model on the GPU at a time; with --compile also transformers compiled."""
    cfg = mtrain_config(shape, layers)
    ids, _ = batch(cfg, args.batch, args.seq, "cuda")
    fpt = flops_per_token(cfg, args.seq, train=False)
    res, state = {}, None
    for name, rl, compiled in (("rl=on", True, False), ("rl=off", False, False), ("rl=on+compile", True, True),
                               ("rl=off+compile", False, True)):
        if compiled and not args.compile:
            continue
        model = make_mtrain(cfg, "cuda", rl=rl).eval()
        if state is None:
            state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
        if compiled:
            model.compile_layers()
        free()
        with torch.no_grad():
            t = time_cuda(lambda: model(ids), warmup=2, iters=5)
        res[name] = (ids.numel() / t, torch.cuda.max_memory_allocated() / 2**30)
        print(f"  eval {shape} x{layers} mtrain {name}: {res[name][0]:,.0f} tok/s, peak {res[name][1]:.1f} GiB", flush=True)
        del model
        free()
    hf = make_hf(cfg, "cuda", state).eval()
    del state
    free()
    refs, why = {}, None
    for kind in ("eager", "compiled") if args.compile else ("eager",):
        run = torch.compile(hf) if kind == "compiled" else hf
        try:
            with torch.no_grad():
                t = time_cuda(lambda: run(input_ids=ids, use_cache=False).logits, warmup=2, iters=5)
        except Exception as e:  # noqa: BLE001  (a compile failure is a result: recorded, the eager ratio stands)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"  eval {shape} x{layers} transformers {kind}: failed ({why})", flush=True)
            continue
        refs[kind] = (ids.numel() / t, torch.cuda.max_memory_allocated() / 2**30)
        print(f"  eval {shape} x{layers} transformers {kind}: {refs[kind][0]:,.0f} tok/s, peak {refs[kind][1]:.1f} GiB",
              flush=True)
        free()
    del hf
    free()
    ref, cref = refs["eager"], refs.get("compiled")
    return [
        dict(bench="eval_forward", shape=shape, layers=layers, tokens=f"{args.batch}x{args.seq}", variant=name,
             rl=name.startswith("rl=on"), mtrain_tok_s=round(tps), ref_tok_s=round(ref[0]), ratio=round(tps / ref[0], 3),
             ref_compiled_tok_s=round(cref[0]) if cref else None,
             ratio_vs_compiled=round(tps / cref[0], 3) if cref else None, ref_compiled_error=why,
             mfu=round(tps * fpt / 1e12 / peak_tflops, 3), peak_tflops_spec=peak_tflops,
             mtrain_peak_gib=round(mem, 2), ref_peak_gib=round(ref[1], 2))
        for name, (tps, mem) in res.items()
    ]


def main():
    global args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=["qwen3_30b_a3b", "glm45_air"], help="train-step shapes (none: eval only)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time mtrain with torch.compile'd decoder layers")
    p.add_argument("--liger", action="store_true", help="also time transformers + Liger kernels (needs liger-kernel)")
    p.add_argument("--eval-layers", type=int, default=0, help="also time eval forward at this depth (Qwen3 shape)")
    p.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results.jsonl")
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 gate GEMM must be real fp32
    peak, matmul = spec_peak_tflops(), matmul_tflops()
    print(f"{card()}: MFU against the dense bf16 spec peak {peak:.0f} TFLOP/s (measured dense matmul: {matmul:.0f})",
          flush=True)
    rows = []
    for shape in args.shapes:
        num = check_numerics(shape, args)
        print(f"  {shape} numerics vs transformers (bf16): {num}", flush=True)
        bad = numerics_failures(num)
        if bad:
            raise SystemExit(f"{shape}: numerics check failed, not timing a wrong model: " + "; ".join(bad))
        rows += [r | {"numerics": num} for r in bench_train(shape, args, peak, matmul)]
    if args.eval_layers:
        rows += bench_eval("qwen3_30b_a3b", args.eval_layers, args, peak)
    if not args.no_save:
        append_results(rows)
    print(f"\n{'bench':12} {'shape':14} {'L':>3} {'variant':16} {'mtrain tok/s':>13} {'ref tok/s':>10} {'ratio':>6} "
          f"{'ref compiled':>12} {'ratio':>6} {'Liger':>7} {'ratio':>6} {'MFU':>6} {'ref MFU':>7} {'peak GiB':>9} "
          f"{'ref GiB':>8} {'Liger GiB':>9}")
    for r in rows:
        rc, rr = r.get("ref_compiled_tok_s"), r.get("ratio_vs_compiled")
        lt, lrat, lg = r.get("liger_tok_s"), r.get("ratio_vs_liger"), r.get("liger_peak_gib")
        print(f"{r['bench']:12} {r['shape']:14} {r['layers']:>3} {r['variant']:16} {r['mtrain_tok_s']:>13,} "
              f"{r['ref_tok_s']:>10,} {r['ratio']:>6.2f} {rc if rc else '-':>12} {rr if rr else '-':>6} "
              f"{lt if lt else '-':>7} {lrat if lrat else '-':>6} "
              f"{r['mfu']:>6.1%} {r.get('ref_mfu', float('nan')):>7.1%} "
              f"{r['mtrain_peak_gib']:>9.1f} {r['ref_peak_gib']:>8.1f} {lg if lg else '-':>9}")


if __name__ == "__main__":
    main()
