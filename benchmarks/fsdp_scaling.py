"""FSDP2 scaling: training tokens/s per GPU on 1 vs N GPUs (weak scaling: the same micro-batch on every GPU).

    python benchmarks/fsdp_scaling.py --gpus 2            # Qwen3-30B-A3B shape: 4 layers (fits one GPU with AdamW)
                                                          # and a deeper one that does not fit one GPU (auto depth)
    python benchmarks/fsdp_scaling.py --smoke             # CPU/gloo, tiny shape, 1 and 2 processes: checks the script
    python benchmarks/fsdp_scaling.py --compile-split --rl --cli-data --profile [--keep-gathered]
                                                          # one GPU, eager then compiled layers: speed-up and where
                                                          # each step's kernel time goes (``fsdp_profile`` rows)

The script starts ``torchrun --standalone --nproc_per_node K`` of itself (``--worker``) for each case and world size;
each worker builds the model on the meta device, shards it with ``mtrain.parallel.apply_fsdp`` (decoder layers, fp32
router gates as their own units under rl=on), initialises the local shards, and times ``--steps`` AdamW steps of the
plain loop (``benchmarks.common.train_steps``) after ``--warmup`` steps, in ``--precision`` (default ``bf16-mixed``: fp32
master weights sharded, bf16 compute, fp32 gradient reduce -- what ``trainer=fsdp`` runs).

Self-checks: before the first step, the loss of the same rows with the same weights (rank 0's rows of the N-GPU
global batch are the 1-GPU batch) agrees between 1 GPU and N sharded GPUs to 1e-3 relative (a sharding or gather bug
changes it by far more; different batches never enter the comparison); every loss is finite; the deep case really runs out of memory on one GPU (else its depth is too small to show anything).
Prints a table and appends one JSON line per case to benchmarks/results.jsonl (and $OUT): date, card, GPUs, shape,
layers, params, tokens/s per GPU, scaling efficiency = (tokens/s per GPU on N) / (tokens/s per GPU on 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

from mtrain.models import PrecisionPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import (  # noqa: E402
    append_results, card, flops_per_token, mtrain_config, rank_slice, synthetic_batches, train_steps,
)

BYTES_PER_PARAM = {"bf16-mixed": 16, "32-true": 16, "bf16-true": 8}  # weights + grads + AdamW's two states


def count_params(cfg) -> int:
    from mtrain.models import build_model

    return sum(p.numel() for p in build_model(cfg, device="meta", init=False).parameters())


# ---------------------------------------------------------------------------------------------------------------
# worker: one torchrun process
# ---------------------------------------------------------------------------------------------------------------


def worker(a) -> None:
    import torch.distributed as dist

    from mtrain.parallel import build_sharded, dp_mesh, fsdp_precision, init_distributed

    device = init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = dp_mesh(device.type)
    stored, param_dtype, reduce_dtype = fsdp_precision(a.precision)
    cfg = mtrain_config(a.shape, a.layers)
    if a.cli_data:  # the CLI benchmarks' data (sft_cli.py): packed synthetic arithmetic, not uniform random tokens
        batches = cli_batches(world, a.batch, a.seq, a.warmup + a.steps)
    else:
        batches = synthetic_batches(cfg.vocab_size, a.batch * world, a.seq, a.warmup + a.steps, seed=0)
    out = {"world": world, "oom": False}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        model, _ = build_sharded(
            cfg, mesh=mesh, device=device, dtype=stored, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
            policy=PrecisionPolicy(a.rl, a.rl), seed=0, reshard_after_forward=not a.keep_gathered,
        )
        model.activation_checkpointing = a.activation_checkpointing
        if a.compile:
            model.compile_layers()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95),  # fused on CUDA, as the CLI's
                                **({"fused": True} if device.type == "cuda" else {}))
        with torch.no_grad():  # rank 0's rows of the first batch are the 1-GPU run's whole first batch
            ids, targets = (t.to(device) for t in rank_slice(batches[0], rank, world))
            out["first_loss_rank0_rows"] = model.loss(ids, targets).item()
        out["losses"] = train_steps(model, opt, batches[: a.warmup], device=device, grad_clip=1.0)
        sync()
        dist.barrier()
        start = time.perf_counter()
        out["losses"] += train_steps(model, opt, batches[a.warmup :], device=device, grad_clip=1.0)
        sync()
        seconds = time.perf_counter() - start
        out["tok_s_per_gpu"] = a.batch * a.seq * a.steps / seconds
        out["step_s"] = seconds / a.steps
        if a.profile and device.type == "cuda":  # every rank steps (collectives); rank 0's kernels are reported
            from benchmarks.profile_step import profile

            it = iter(batches * 4)
            out["profile"] = profile(lambda: train_steps(model, opt, [next(it)], device=device, grad_clip=1.0), 3,
                                     host=True)
        if device.type == "cuda":
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            out["peak_gib"] = round(peak.item(), 2)
    except torch.cuda.OutOfMemoryError as e:  # only safe to catch with one process (peers would wait forever)
        out["oom"] = True
        out["error"] = str(e).splitlines()[0][:200]
    if rank == 0:
        with open(a.json, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


def cli_batches(world: int, batch: int, seq: int, steps: int) -> list:
    """Global batches of the ``sft_cli.py`` job's train loader (its packed rows, ``world * batch`` rows a step)."""
    from benchmarks.sft_cli import GPU, compose
    from mtrain.data import build_datamodule

    cfg = compose([*GPU, f"data.batch_size={batch * world}", f"data.max_length={seq}"])
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    rows = []
    while len(rows) < steps:  # as many epochs as the steps need, no more batches than that
        rows += [(b["input_ids"], b["targets"]) for b in itertools.islice(dm.train_dataloader(), steps - len(rows))]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# orchestrator
# ---------------------------------------------------------------------------------------------------------------


def run_case(a, layers: int, world: int, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
            os.path.abspath(__file__), "--worker", "--json", path, "--shape", a.shape, "--layers", str(layers),
            "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--precision", a.precision,
        ] + [f"--{flag}" for flag, on in (("rl", a.rl), ("compile", a.compile), ("profile", a.profile),
                                          ("cli-data", a.cli_data), ("keep-gathered", a.keep_gathered)) if on] + (
            ["--activation-checkpointing"] if a.activation_checkpointing else []
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(path):
            tail = (r.stdout + r.stderr)[-3000:]
            if "OutOfMemoryError" in tail or "CUDA out of memory" in tail:
                return {"world": world, "oom": True, "error": "CUDA out of memory"}
            raise RuntimeError(f"worker failed (layers={layers}, world={world}, rc={r.returncode}):\n{tail}")
        with open(path) as f:
            return json.load(f)


def compile_split(a) -> None:
    """One GPU, the same sharded model eager and with compiled layers: tokens/s, the speed-up, and (``--profile``)
    kernel time by category; one ``fsdp_profile`` row."""
    row = {"bench": "fsdp_profile", "shape": a.shape, "layers": a.layers, "gpus": 1, "rl": a.rl,
           "tokens_per_gpu_step": f"{a.batch}x{a.seq}", "data": "cli" if a.cli_data else "random",
           "reshard_after_forward": not a.keep_gathered, "card": card(),
           "how": "fsdp_scaling.py --compile-split: apply_fsdp, bf16-mixed, fused AdamW with the clip in its step"}
    for compiled in (False, True):
        a.compile = compiled
        r = run_case(a, a.layers, 1, a.timeout)
        key = "compiled" if compiled else "eager"
        row[key] = {"tok_s": round(r["tok_s_per_gpu"]), "step_ms": round(1e3 * r["step_s"], 2),
                    "first_loss": round(r["losses"][0], 5), "peak_gib": r.get("peak_gib"), **r.get("profile", {})}
        kernels = f", kernels {r['profile']['kernel_ms']} ms: {r['profile']['categories_ms']}" if "profile" in r else ""
        print(f"{key}: {r['tok_s_per_gpu']:,.0f} tokens/s, step {1e3 * r['step_s']:.1f} ms, "
              f"peak {r.get('peak_gib')} GiB{kernels}", flush=True)
        if "host_top_ms" in r.get("profile", {}):
            print(f"  host ops' own CPU time {r['profile']['host_self_ms']} ms a step; the largest (ms, calls):")
            for name, ms, calls in r["profile"]["host_top_ms"]:
                print(f"    {ms:8.2f} x{calls:<5} {name}")
    row["compile_speedup"] = round(row["compiled"]["tok_s"] / row["eager"]["tok_s"], 3)
    print(f"compile speed-up under FSDP (1 GPU): {row['compile_speedup']:.3f}x")
    if not a.smoke:
        append_results([row])


def auto_deep_layers(a, fit_layers: int) -> int:
    """The fewest layers whose weights + grads + AdamW states exceed one GPU's memory (by 10%)."""
    mem = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 80 * 2**30
    per_param = BYTES_PER_PARAM[a.precision]
    base = count_params(mtrain_config(a.shape, 0))
    layer = count_params(mtrain_config(a.shape, 1)) - base
    return max(fit_layers + 1, math.ceil((1.1 * mem / per_param - base) / layer))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2, help="N: compare 1 GPU with N GPUs")
    p.add_argument("--shape", default="qwen3_30b_a3b")
    p.add_argument("--layers", type=int, default=4, help="depth of the case that fits one GPU")
    p.add_argument("--deep-layers", type=int, default=None, help="depth of the case that does not (default: auto)")
    p.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="bf16-mixed", choices=sorted(BYTES_PER_PARAM))
    p.add_argument("--rl", action="store_true", help="rl=on: fp32 router gates (own FSDP units) and fp32 RoPE")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--cli-data", action="store_true", help="the CLI benchmarks' packed rows, not random tokens")
    p.add_argument("--profile", action="store_true", help="also the kernel time by category of 3 steps (rank 0)")
    p.add_argument("--keep-gathered", action="store_true",
                   help="reshard_after_forward=False (trainer.fsdp_reshard_after_forward=false): one gather a step")
    p.add_argument("--compile-split", action="store_true", help="one GPU, eager and compiled: the compile speed-up")
    p.add_argument("--smoke", action="store_true", help="CPU/gloo, tiny shape: check the script, write no results")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if a.smoke:
        a.shape, a.layers, a.deep_layers, a.batch, a.seq, a.steps, a.warmup = "tiny_qwen", 2, 3, 2, 32, 2, 1
        a.gpus = 2
    elif not torch.cuda.is_available() or torch.cuda.device_count() < (need := 1 if a.compile_split else a.gpus):
        sys.exit(f"needs {need} CUDA device(s) (or --smoke)")
    if a.compile_split:
        return compile_split(a)
    deep = a.deep_layers or auto_deep_layers(a, a.layers)
    rows, problems = [], []
    for kind, layers in (("fits_one_gpu", a.layers), ("deeper_than_one_gpu", deep)):
        cfg = mtrain_config(a.shape, layers)
        params = count_params(cfg)
        results = {w: run_case(a, layers, w, a.timeout) for w in (1, a.gpus)}
        one, many = results[1], results[a.gpus]
        if many["oom"]:
            problems.append(f"{kind}: out of memory on {a.gpus} GPUs ({layers} layers); lower --deep-layers")
            continue
        losses = many["losses"] + ([] if one["oom"] else one["losses"])
        if not all(math.isfinite(x) for x in losses):
            problems.append(f"{kind}: non-finite loss {losses}")
        if kind == "fits_one_gpu":
            if one["oom"]:
                problems.append(f"fits_one_gpu: out of memory on one GPU ({layers} layers); lower --layers")
                continue
            l1, ln = one["first_loss_rank0_rows"], many["first_loss_rank0_rows"]
            if abs(l1 - ln) > 1e-3 * abs(l1):
                problems.append(f"loss of the same rows with the same weights differs: 1 GPU {l1:.6f} vs {a.gpus} "
                                f"GPUs (sharded) {ln:.6f}")
        elif not one["oom"] and not a.smoke:
            problems.append(f"deeper_than_one_gpu: {layers} layers fit one GPU; raise --deep-layers")
        eff = None if one["oom"] else many["tok_s_per_gpu"] / one["tok_s_per_gpu"]
        for w, r in results.items():
            rows.append({
                "bench": "fsdp_scaling", "case": kind, "shape": a.shape, "layers": layers,
                "params_b": round(params / 1e9, 3), "gpus": w, "precision": a.precision, "rl": a.rl,
                "compile": a.compile, "tokens_per_gpu_step": f"{a.batch}x{a.seq}", "oom": r["oom"],
                "tok_s_per_gpu": None if r["oom"] else round(r["tok_s_per_gpu"], 1),
                "tflops_per_gpu": None if r["oom"] else round(
                    r["tok_s_per_gpu"] * flops_per_token(cfg, a.seq, train=True) / 1e12, 1),
                "peak_gib": r.get("peak_gib"),
                "scaling_efficiency": None if (w == 1 or eff is None) else round(eff, 3),
                "first_loss": None if r["oom"] else round(r["losses"][0], 5),
            })
    print(f"\nFSDP2 scaling on {card()} ({a.precision}, {'rl=on' if a.rl else 'rl=off'}, "
          f"{a.batch}x{a.seq} tokens per GPU per step)")
    print(f"{'case':<22}{'layers':>7}{'params':>9}{'GPUs':>6}{'tok/s/GPU':>12}{'TFLOP/s/GPU':>13}{'peak GiB':>10}"
          f"{'efficiency':>12}")
    for r in rows:
        tok = "OOM" if r["oom"] else f"{r['tok_s_per_gpu']:.0f}"
        tfl = "-" if r["oom"] else f"{r['tflops_per_gpu']:.1f}"
        eff = "-" if r["scaling_efficiency"] is None else f"{100 * r['scaling_efficiency']:.1f}%"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"{r['case']:<22}{r['layers']:>7}{r['params_b']:>8.2f}B{r['gpus']:>6}{tok:>12}{tfl:>13}{peak:>10}"
              f"{eff:>12}")
    for msg in problems:
        print(f"CHECK FAILED: {msg}")
    if not a.smoke:
        append_results(rows)
    if problems:
        sys.exit(1)
    print("checks passed: same-rows loss on N sharded GPUs within 1e-3 of 1 GPU, finite losses"
          + ("" if a.smoke else ", the deep case does not fit one GPU"))


if __name__ == "__main__":
    main()
