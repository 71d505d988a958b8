"""Sustained training steps with the GPU's SM clock and power read alongside: does the card slow mtrain's GEMMs down?

    python benchmarks/sustained_step.py                          # GLM-4.5-Air shape, 4 layers, 4 x 2048 tokens, rl=on
    python benchmarks/sustained_step.py --shape qwen3_30b_a3b --chunks 2048 4096

The profile (``profile_step.py --ops``) found the same GEMM shapes with the same kernels 4-6% slower inside mtrain's
compiled step than inside transformers' eager one. One explanation is the card's power limit: a step with few
memory-bound gaps draws more power, and the card lowers its clock to stay under the limit. This script tests that.
It keeps mtrain (rl=on, compiled layers) and transformers (eager, grouped_mm; identical weights) on the GPU together
and runs each for ``--seconds`` of back-to-back steps, alternating (A B A B ...: drift in temperature hits both).
``nvidia-smi`` samples the SM clock, the power draw and the power limit every 50 ms meanwhile. A plain bf16 GEMM loop
(8192^3) gives the card's clock and power at full GEMM load. With ``--chunks``, mtrain runs once per lm_head loss
chunk size; the peak memory a phase adds over what was allocated before it is printed too, since both models stay
resident. ``--graph`` adds mtrain's step captured whole (forward and backward) in one CUDA graph and replayed: no
host launch gaps at all (its loss and gradients are checked against the plain step first). ``--hf-compiled`` adds
transformers under ``torch.compile``. Appends one ``sustained_step`` row per phase to benchmarks/results.jsonl (and
$OUT).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    append_results, batch, card, hf_step, make_hf, make_mtrain, mtrain_config, ours_step,
)


class ClockSampler:
    """``nvidia-smi`` in the background while the block runs: mean SM clock (MHz), power draw and limit (W)."""

    FIELDS = ("clocks.sm", "power.draw", "power.limit", "temperature.gpu")

    def __init__(self, period_ms: int = 50):
        self.cmd = ["nvidia-smi", f"--query-gpu={','.join(self.FIELDS)}", "--format=csv,noheader,nounits",
                    "-i", f"GPU-{torch.cuda.get_device_properties(0).uuid}", "-lms", str(period_ms)]
        self.summary: dict = {}

    def __enter__(self):
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        out, err = self.proc.communicate(timeout=10)
        rows = []
        for line in out.splitlines():
            try:
                rows.append([float(x) for x in line.split(",")])
            except ValueError:
                continue
        if not rows:
            self.summary = {"clock_error": (err or out).strip()[:200] or "no samples"}
            return
        cols = list(zip(*rows))
        self.summary = {"samples": len(rows), "sm_mhz": round(statistics.mean(cols[0])),
                        "sm_mhz_min": round(min(cols[0])), "power_w": round(statistics.mean(cols[1]), 1),
                        "power_limit_w": round(statistics.mean(cols[2])), "temp_c": round(statistics.mean(cols[3]))}


def sustained(step, tokens: int, seconds: float, sync_every: int = 4) -> dict:
    """Back-to-back steps for ``seconds`` (a sync every ``sync_every`` steps only), clocks sampled: tokens/s etc."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    n, t0 = 0, time.perf_counter()
    with ClockSampler() as clocks:
        while time.perf_counter() - t0 < seconds:
            for _ in range(sync_every):
                step()
            n += sync_every
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return {"tok_s": round(n * tokens / wall), "steps": n, "step_ms": round(1e3 * wall / n, 2),
            "peak_added_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2), **clocks.summary}


def graphed(model, ids, targets, chunk_size: int):
    """mtrain's compiled fwd+bwd captured once into a CUDA graph and replayed; checks the replay's loss and
    gradients against the plain step first. The graph's memory pool is allocated at capture, before any phase runs
    (its phase reads no added peak): ``graph_pool_gib`` in the row says how large it is."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    ref_loss = model.loss(ids, targets, chunk_size=chunk_size)
    ref_loss.backward()
    # drop the autograd graph: it keeps the leaves' AccumulateGrad nodes, created on the default stream, which the
    # captured backward would then reuse (the capture fails: "would make the legacy stream depend on a capturing ...")
    ref_loss = ref_loss.item()
    ref_grads = [p.grad.clone() for p in params]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model.loss(ids, targets, chunk_size=chunk_size).backward()
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # as torch.cuda.graph does on entry: what is reserved after it is the graph's pool
    before = torch.cuda.memory_reserved()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loss = model.loss(ids, targets, chunk_size=chunk_size)
        loss.backward()
    pool_gib = (torch.cuda.memory_reserved() - before) / 2**30
    grads = [p.grad for p in params]
    g.replay()
    torch.cuda.synchronize()
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads, ref_grads))
    print(f"  CUDA graph: loss {loss.item():.6f} vs {ref_loss:.6f}, max grad diff {diff:.3e}", flush=True)

    def run():
        g.replay()
    run.check = {"graph_loss_diff": abs(loss.item() - ref_loss), "graph_max_grad_diff": diff,  # into the rows
                 "graph_pool_gib": round(pool_gib, 2)}
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="glm45_air")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=8.0, help="per phase")
    p.add_argument("--rounds", type=int, default=2, help="A B rounds")
    p.add_argument("--chunks", type=int, nargs="+", default=[2048], help="mtrain's lm_head loss chunk sizes")
    p.add_argument("--graph", action="store_true", help="also mtrain's compiled fwd+bwd captured in one CUDA graph")
    p.add_argument("--hf-compiled", action="store_true", help="also transformers with torch.compile")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 gate GEMM must be real fp32
    cfg = mtrain_config(a.shape, a.layers)
    ids, targets = batch(cfg, a.batch, a.seq, "cuda")
    ours = make_mtrain(cfg, "cuda", rl=True).train()
    ref = make_hf(cfg, "cuda", ours.state_dict()).train()
    ours.compile_layers()
    mm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def train(model, step, **kw):
        def run():
            model.zero_grad(set_to_none=True)
            step(model, ids, targets, **kw)
        return run

    phases = {f"mtrain compiled, loss chunk {c}": (train(ours, ours_step, chunk_size=c), ids.numel())
              for c in a.chunks}
    if a.graph:
        chunk = a.chunks[0]
        phases[f"mtrain compiled + CUDA graph, loss chunk {chunk}"] = (graphed(ours, ids, targets, chunk), ids.numel())
    phases["transformers eager"] = (train(ref, hf_step), ids.numel())
    if a.hf_compiled:
        ref_c = make_hf(cfg, "cuda", ours.state_dict()).train()
        ref_c.compile()
        phases["transformers compiled"] = (train(ref_c, hf_step), ids.numel())
    phases["bf16 GEMM 8192^3"] = (lambda: mm @ mm, 0)
    rows = []
    print(f"{card()}, {a.shape} x{a.layers}, {a.batch}x{a.seq} tokens, {a.seconds:.0f} s per phase", flush=True)
    for r in range(a.rounds):
        for name, (step, tokens) in phases.items():
            res = sustained(step, tokens or 1, a.seconds)
            if not tokens:
                res["tflops"] = round(2 * 8192**3 * res.pop("tok_s") / 1e12, 1)
            rows.append({"bench": "sustained_step", "shape": a.shape, "layers": a.layers,
                         "tokens": f"{a.batch}x{a.seq}", "phase": name, "round": r, "seconds": a.seconds, **res,
                         **getattr(step, "check", {})})
            print(f"  round {r} {name:34s} " + " ".join(f"{k} {v}" for k, v in res.items()), flush=True)
    if not a.no_save:
        append_results(rows)
    print(f"\n{'phase':34s} {'tok/s':>8} {'step ms':>8} {'SM MHz':>7} {'min':>5} {'W':>6} {'limit':>6} {'°C':>4}")
    for name in phases:
        rs = [r for r in rows if r["phase"] == name]

        def mean(k):
            v = [r[k] for r in rs if r.get(k) is not None]
            return statistics.mean(v) if v else float("nan")

        speed = f"{mean('tok_s'):>8,.0f}" if "tok_s" in rs[0] else f"{mean('tflops'):>5.0f} TF"
        print(f"{name:34s} {speed} {mean('step_ms'):>8.1f} {mean('sm_mhz'):>7.0f} {mean('sm_mhz_min'):>5.0f} "
              f"{mean('power_w'):>6.0f} {mean('power_limit_w'):>6.0f} {mean('temp_c'):>4.0f}")


if __name__ == "__main__":
    main()
