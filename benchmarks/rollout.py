"""The rollout engines on one GPU: tokens/s, ms per decode step, bytes read per step and the share of the card's
copy bandwidth they reach; exact mode's bit identity to the trainer's scoring, before and after weight updates.

Per shape (Qwen3-30B-A3B and GLM-4.5-Air at 4 layers; ``--full`` adds the 48-layer Qwen3-30B-A3B), per engine
(``fast``: the rl=off profile, gate in bf16; ``exact``: the rl=on profile, fp32 gate, batch-invariant kernels), per
batch (64, 256 responses) and length (256, 1024 new tokens after 128-token prompts, sampled at T=1, no stop token):

* one warm-up generate (captures the CUDA graphs of the batch's bucket), then the timed generates: one of a single new
  token (prefill + first token) and one of N. ms per decode step = (t_N - t_1) / (N - 1);
* bytes a decode step reads: every non-expert weight (attention, norms, router, dense/shared MLPs, lm_head), the
  routed experts at least one of the B tokens picks (a share 1 - (1 - k/E)^B of them), and the KV cache at the mean
  length (prompt + N/2); achieved bandwidth = bytes / step time, against a device-to-device copy measured here;
* exact mode: the trainer's scoring (``mtrain.models.decoding.score``) of each rollout against the rollout's logprobs
  and experts (max |dlogp|, routing disagreement: both must be 0), then a weight update handed over to the engine
  and the check again.

``--baseline`` adds today's ``rl=on`` rollout (the recompute reference engine) at 64 x 256 on the Qwen3 shape.

    python benchmarks/rollout.py --full --baseline          # one H200: about 5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_results, card, mtrain_config, time_cuda  # noqa: E402
from mtrain.models import PrecisionPolicy, RoutingTrace, build_model  # noqa: E402
from mtrain.models.decoding import score  # noqa: E402
from mtrain.rl.engines import FastEngine, RecomputeEngine, RolloutRequest, SamplingConfig  # noqa: E402

PROMPT = 128


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 4 GB device-to-device copy."""
    a = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = time_cuda(lambda: b.copy_(a), warmup=3, iters=10)
    return 2 * a.numel() * a.element_size() / t


def step_bytes(model, batch: int, kv_len: float) -> float:
    cfg = model.config
    experts = other = 0
    for name, p in model.named_parameters():
        size = p.numel() * p.element_size()
        if ".experts." in name and "shared" not in name:
            experts += size
        elif "embed_tokens" not in name or model.lm_head is None:
            other += size
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    touched = 1 - (1 - k / E) ** batch
    kv = batch * kv_len * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim_ * 2 * 2
    return other + experts * touched + kv


def prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, PROMPT), generator=g).tolist()


def timed(engine, ps, new: int, seed: int = 0):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(RolloutRequest(ps, SamplingConfig(new, temperature=1.0), seed=seed))
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def exactness(trainer, gen) -> tuple[float, float]:
    trace = RoutingTrace()
    lp = score(trainer, gen, trace=trace)
    producing = slice(gen.first - 1, gen.first - 1 + gen.tokens.shape[1])
    own = trace.stacked()[:, producing]
    valid = gen.mask
    differ = (own.sort(-1).values != gen.routing.sort(-1).values).any(-1)[valid].float().mean().item()
    return (lp - gen.logprobs)[valid].abs().max().item(), differ


def perturb(model, scale: float = 0.02) -> None:
    """A weight update: every parameter moves by ``scale`` of its own std."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (p.float().std() * scale).to(p.dtype))


def profile_steps(engine, ps, out_dir: str, tag: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed(engine, ps, 33)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(table)
    if out_dir:
        Path(out_dir, f"profile_{tag}.txt").write_text(table)


def run_shape(shape: str, layers: int, batches, lengths, bw: float, args, rows: list) -> None:
    cfg = mtrain_config(shape, layers)
    for mode in ("fast", "exact"):
        rl = mode == "exact"
        policy = PrecisionPolicy(rl, rl)
        if rl:
            PrecisionPolicy(True).apply_backends(True)
        trainer = build_model(cfg, dtype=torch.bfloat16, device="cuda", policy=policy, seed=0).eval()
        share = layers > 8  # the 48-layer model: the engine reads the trainer's weights (no second copy)
        engine = (FastEngine(model=trainer, exact=rl) if share else
                  FastEngine(copy_of=trainer, policy=policy, exact=rl))
        for B in batches:
            ps = prompts(B, cfg.vocab_size)
            try:
                timed(engine, ps, 16)  # warm-up: Triton compiles, CUDA graphs of this bucket
                _, t1 = timed(engine, ps, 1)
                for N in lengths:
                    out, tN = timed(engine, ps, N, seed=1)
                    gen = out.gen
                    assert int(gen.lengths.min()) == N, "a row stopped early"
                    step_ms = (tN - t1) / (N - 1) * 1e3
                    nbytes = step_bytes(trainer, B, PROMPT + N / 2)
                    row = {"bench": "rollout", "shape": shape, "layers": layers, "engine": mode, "batch": B,
                           "prompt": PROMPT, "new_tokens": N, "seconds": round(tN, 3), "prefill_s": round(t1, 3),
                           "tokens_per_s": round(B * N / tN, 1), "ms_per_step": round(step_ms, 3),
                           "gb_per_step": round(nbytes / 1e9, 3),
                           "bandwidth_tb_s": round(nbytes / (step_ms / 1e3) / 1e12, 3),
                           "copy_bandwidth_tb_s": round(bw / 1e12, 3),
                           "bandwidth_share": round(nbytes / (step_ms / 1e3) / bw, 3),
                           "floor_tokens_per_s": round(B / (nbytes / bw), 1), "graphs": engine.decoder.graphs_on}
                    if rl:
                        checks = []
                        for update in range(2 if not share else 1):
                            d, r = exactness(trainer, gen)
                            checks.append([d, r])
                            if update == 0 and not share:
                                perturb(trainer)
                                engine.sync(trainer)
                                gen = timed(engine, ps, N, seed=2)[0].gen
                        row["exact_checks"] = checks  # [max |dlogp|, routing disagreement] per weight version
                        row["bit_identical"] = all(d == 0 and r == 0 for d, r in checks)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if args.profile and B == 64 and layers == 4:
                    profile_steps(engine, ps, os.environ.get("OUT", ""), f"{shape}_{mode}_b{B}")
            except Exception as e:  # noqa: BLE001  (record and go on: one failing config must not lose the rest)
                row = {"bench": "rollout", "shape": shape, "layers": layers, "engine": mode, "batch": B,
                       "error": f"{type(e).__name__}: {e}"[:500]}
                rows.append(row)
                print(json.dumps(row), flush=True)
                import traceback

                traceback.print_exc()
        if args.baseline and mode == "exact" and shape == "qwen3_30b_a3b" and layers == 4:
            ref = RecomputeEngine(model=trainer)
            ps = prompts(64, cfg.vocab_size)
            timed(ref, ps, 2)
            out, t = timed(ref, ps, 256, seed=1)
            row = {"bench": "rollout", "shape": shape, "layers": layers, "engine": "recompute (today's rl=on)",
                   "batch": 64, "prompt": PROMPT, "new_tokens": 256, "seconds": round(t, 3),
                   "tokens_per_s": round(64 * 256 / t, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        engine.close()
        del engine, trainer
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["qwen3_30b_a3b", "glm45_air"])
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--full", action="store_true", help="also the 48-layer Qwen3-30B-A3B (inference, 61 GB)")
    ap.add_argument("--baseline", action="store_true", help="also the recompute reference at 64 x 256 (Qwen3)")
    ap.add_argument("--profile", action="store_true", help="a CUDA kernel table of 32 decode steps at batch 64")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{card()}: device-to-device copy {bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = [{"bench": "copy_bandwidth", "tb_s": round(bw / 1e12, 3)}]
    for shape in args.shapes:
        run_shape(shape, 4, args.batches, args.lengths, bw, args, rows)
    if args.full:
        run_shape("qwen3_30b_a3b", 48, args.batches, [256], bw, args, rows)
    if not args.no_record:
        append_results(rows)
    print(f"\n{'shape':<14}{'L':>3} {'engine':<26}{'B':>4}{'N':>6}{'tok/s':>10}{'ms/step':>9}{'GB/step':>9}"
          f"{'BW share':>9}  exact")
    for r in rows:
        if r.get("bench") != "rollout" or "error" in r:
            if "error" in r:
                print(f"{r['shape']:<14}{r['layers']:>3} {r['engine']:<26}{r['batch']:>4}  ERROR {r['error'][:60]}")
            continue
        print(f"{r['shape']:<14}{r['layers']:>3} {r['engine']:<26}{r['batch']:>4}{r['new_tokens']:>6}"
              f"{r['tokens_per_s']:>10.0f}{r.get('ms_per_step', float('nan')):>9.3f}{r.get('gb_per_step', 0):>9.2f}"
              f"{r.get('bandwidth_share', float('nan')):>9.2f}  {r.get('bit_identical', '')}")


if __name__ == "__main__":
    main()
