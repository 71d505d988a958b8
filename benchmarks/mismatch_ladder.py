"""What each alignment step buys: train-rollout mismatch (``task=mismatch``) for a ladder of rollout profiles, same
weights, prompts and seeds, one run.

    python benchmarks/mismatch_ladder.py                                   # GPU: Qwen3-30B-A3B and GLM-4.5-Air shapes
    python benchmarks/mismatch_ladder.py --experiments tiny_qwen3 tiny_glm4  # CPU smoke, tiny models

Steps: rl=off (engine default: bf16 gate, KV cache) -> fp32 gate only (the FD_ENABLE_RL switch) -> + fp32 RoPE ->
rl=on (+ the exact engine). The trainer profile is always gate fp32, full forward. Prints a table and
appends JSON lines to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydra import compose, initialize_config_dir  # noqa: E402

from benchmarks.common import append_results, card  # noqa: E402
from mtrain.cli import CONFIG_DIR  # noqa: E402
from mtrain.job import Job  # noqa: E402
from mtrain.tasks.mismatch import run  # noqa: E402

LADDER = [
    ("rl=off", ["rl=off"]),
    ("fp32 gate only", ["rl=on", "model.rope_fp32=false", "task.exact=false"]),
    ("+ fp32 RoPE", ["rl=on", "task.exact=false"]),
    ("rl=on (+ exact engine)", ["rl=on"]),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", nargs="+", default=["qwen3_30b_a3b_shape", "glm45_air_shape"])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    os.environ.pop("FD_ENABLE_RL", None)
    rows = []
    for exp in args.experiments:
        for step, overrides in [("warm-up", LADDER[0][1])] + LADDER:  # warm-up: CUDA init and allocator, not timed
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[f"experiment={exp}", "task=mismatch", *overrides,
                                                   f"task.num_prompts={args.prompts}",
                                                   f"task.max_new_tokens={args.new_tokens}"])
            with tempfile.TemporaryDirectory() as tmp:
                job = Job.prepare(cfg, tmp)
                with job.plan.job_env():
                    m = run(job)
            if step == "warm-up":
                continue
            rows.append({"bench": "mismatch_ladder", "experiment": exp, "step": step,
                         **{k: m[k] for k in ("tokens", "routing_disagreement", "tokens_any_layer_differs",
                                              "logprob_abs_diff_mean", "logprob_abs_diff_max", "prob_abs_diff_mean",
                                              "kl_k3", "rollout_tokens_per_s", "rollout_profile", "dtype")}})
            print(f"  {exp} {step}: routing {m['routing_disagreement']:.4f}, rollout {m['rollout_tokens_per_s']:.0f} tok/s",
                  flush=True)
    if not args.no_save:
        append_results(rows)
    print(f"\n{card()}")
    print(f"{'experiment':22} {'step':34} {'routing dis.':>12} {'any layer':>9} {'|dlp| mean':>10} {'|dlp| max':>9} "
          f"{'|dp| mean':>9} {'KL k3':>8} {'rollout tok/s':>13}")
    for r in rows:
        print(f"{r['experiment']:22} {r['step']:34} {r['routing_disagreement']:>12.4%} {r['tokens_any_layer_differs']:>9.2%} "
              f"{r['logprob_abs_diff_mean']:>10.2e} {r['logprob_abs_diff_max']:>9.2e} {r['prob_abs_diff_mean']:>9.2e} "
              f"{r['kl_k3']:>8.1e} {r['rollout_tokens_per_s']:>13.1f}")


if __name__ == "__main__":
    main()
