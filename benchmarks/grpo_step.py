"""One GRPO step on the GPU, split into rollout, old-logprob recompute and update, under rl=on (the fast engine's
exact mode) and rl=off (the fast engine); and how the recompute reference's decode cost grows with response length
against the fast engine's.

    python benchmarks/grpo_step.py                          # Qwen3-30B-A3B shape, 4 layers, bf16, on CUDA
    python benchmarks/grpo_step.py --shape tiny_qwen --smoke  # CPU check of the script

Per profile (rl=on: fp32 gate + RoPE, exact engine; rl=off: gate in bf16, fast engine), with random weights and
random prompts (no eos, so every response has exactly --new-tokens tokens): a step of --prompts x --group responses,
timed phase by phase (after one untimed warm-up step), tokens/s of each phase, and the train/rollout mismatch of the
batch. Then the decode-length sweep (--lengths) at --sweep-batch responses. The table is printed last; rows are
appended to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import append_results, card, mtrain_config  # noqa: E402
from mtrain.models import PrecisionPolicy, build_model  # noqa: E402
from mtrain.rl.grpo import LossSettings, StepBatch, advantages_of, minibatch_loss, mismatch_stats, old_policy  # noqa: E402
from mtrain.rl.engines import FastEngine, RecomputeEngine, RolloutRequest, SamplingConfig  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def profile(rl: bool):
    policy = PrecisionPolicy(moe_gate_fp32=rl, rope_fp32=rl)
    return policy, ("exact" if rl else "fast")


def step(a, cfg, device, rl: bool, new_tokens: int) -> dict:
    policy, decode = profile(rl)
    policy.apply_backends(device.type == "cuda")
    torch.manual_seed(0)
    model = build_model(cfg, dtype=torch.bfloat16, device=device, policy=policy, seed=0)
    engine = FastEngine(copy_of=model, policy=policy, exact=rl)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, cfg.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    prompts = [p for p in prompts for _ in range(a.group)]
    sampling = SamplingConfig(new_tokens, 1.0, 1.0)
    loss_s = LossSettings()
    out = {}
    for it in range(2):  # the first step warms up kernels and the allocator
        roll = engine.generate(RolloutRequest(prompts, sampling, seed=it))
        gen, t_roll = roll.gen, roll.seconds
        rewards = torch.rand(len(prompts), generator=g).round().to(device)  # a synthetic 0/1 reward
        adv, _ = advantages_of(rewards, a.group, "grpo", True)
        old, t_old = clock(lambda: old_policy(model, gen, 0, scoring=engine.scoring))
        batch = StepBatch(gen, rewards, adv, old.logprobs)

        def update():
            for rows in torch.arange(len(prompts), device=device).chunk(a.minibatches):
                loss, _ = minibatch_loss(model, batch, rows, loss_s, 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

        _, t_upd = clock(update)
        engine.sync(model)
        generated = int(gen.lengths.sum())
        seq_tokens = len(prompts) * gen.width
        out = {
            "rollout_s": t_roll, "old_logprobs_s": t_old, "update_s": t_upd,
            "rollout_tokens_per_s": generated / t_roll, "old_logprobs_tokens_per_s": seq_tokens / t_old,
            "update_tokens_per_s": seq_tokens / t_upd, "responses": len(prompts), "new_tokens": new_tokens,
            **mismatch_stats(gen, old),
        }
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, engine, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def decode_only(a, cfg, device, reference: bool, new_tokens: int) -> float:
    """Seconds of one rollout of --sweep-batch responses: the recompute reference, or the fast engine (exact)."""
    policy, _ = profile(True)
    model = build_model(cfg, dtype=torch.bfloat16, device=device, policy=policy, seed=0)
    engine = RecomputeEngine(model=model) if reference else FastEngine(model=model, exact=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cfg.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.sweep_batch)]
    engine.generate(RolloutRequest(prompts, SamplingConfig(min(new_tokens, 8), 1.0, 1.0)))  # warm-up
    seconds = engine.generate(RolloutRequest(prompts, SamplingConfig(new_tokens, 1.0, 1.0), seed=1)).seconds
    del model, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3_30b_a3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--minibatches", type=int, default=4)
    p.add_argument("--lengths", default="64,256,1024")
    p.add_argument("--sweep-batch", type=int, default=16)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check)")
    a = p.parse_args()
    if a.smoke:
        a.prompts, a.group, a.prompt_len, a.new_tokens, a.lengths, a.sweep_batch = 2, 2, 8, 8, "4,8", 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = mtrain_config(a.shape, a.layers)
    rows = []
    for rl in (True, False):
        r = step(a, cfg, device, rl, a.new_tokens)
        rows.append({"bench": "grpo_step", "shape": a.shape, "layers": a.layers, "rl": rl,
                     "decode": profile(rl)[1], **{k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}})
    sweep = []
    for n in [int(x) for x in a.lengths.split(",")]:
        on, off = decode_only(a, cfg, device, True, n), decode_only(a, cfg, device, False, n)
        sweep.append({"bench": "grpo_decode_length", "shape": a.shape, "layers": a.layers, "batch": a.sweep_batch,
                      "new_tokens": n, "recompute_s": round(on, 4), "exact_s": round(off, 4),
                      "recompute_over_exact": round(on / off, 2)})
    append_results(rows + sweep)
    print(f"\nGRPO step on {card()}: {a.shape}, {a.layers} layers, bf16, {a.prompts}x{a.group} responses of "
          f"{a.new_tokens} tokens after {a.prompt_len}-token prompts, {a.minibatches} mini-batch updates")
    print(f"{'profile':<22}{'rollout s':>10}{'gen tok/s':>11}{'old-lp s':>10}{'tok/s':>10}{'update s':>10}"
          f"{'tok/s':>10}{'|dlogp| max':>13}{'route dis.':>11}")
    for r in rows:
        name = f"rl={'on' if r['rl'] else 'off'} ({r['decode']})"
        print(f"{name:<22}{r['rollout_s']:>10.2f}{r['rollout_tokens_per_s']:>11,.0f}{r['old_logprobs_s']:>10.3f}"
              f"{r['old_logprobs_tokens_per_s']:>10,.0f}{r['update_s']:>10.3f}{r['update_tokens_per_s']:>10,.0f}"
              f"{r['mismatch/logprob_abs_diff_max']:>13.2e}{100 * r['mismatch/routing_disagreement']:>10.2f}%")
    print(f"\ndecode cost vs response length ({a.sweep_batch} responses): the recompute reference vs the exact engine")
    for r in sweep:
        print(f"  {r['new_tokens']:>5} new tokens: recompute {r['recompute_s']:.2f} s, exact {r['exact_s']:.2f} s, "
              f"ratio {r['recompute_over_exact']:.1f}x")


if __name__ == "__main__":
    main()
