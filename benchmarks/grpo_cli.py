"""GRPO through the CLI, as a user runs it: where an RL step's time goes with each engine.

    python benchmarks/grpo_cli.py                      # rl=on and rl=off at the Qwen3-30B-A3B shape (4 layers)
    python benchmarks/grpo_cli.py --set task.engine=recompute --rl on     # today's rl=on rollout, for the ratio

Runs ``python -m mtrain experiment=grpo_qwen3_30b_a3b_shape rl=<on|off> trainer.max_steps=12
task.max_new_tokens=128`` (64 responses a step, the held-out eval at steps 0, 10 and 12; no checkpoints) and records
from its ``metrics.json``: seconds of the fit and of each phase (rollout, old-logprob recompute, update, eval),
their shares, the rollout tokens/s of the last step, the mean train/rollout k3 and routing disagreement, and the
command's wall time. Rows: ``grpo_cli`` in benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_results, run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = ("rollout_tokens_per_s", "mismatch_k3_mean", "mismatch_routing_disagreement_mean",
        "mismatch_logprob_abs_diff_max", "engine", "time_share", "val_accuracy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rl", nargs="+", default=["on", "off"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--experiment", default="grpo_qwen3_30b_a3b_shape")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides")
    args = ap.parse_args()
    rows = []
    for rl in args.rl:
        run_dir = Path(tempfile.mkdtemp(prefix=f"grpo_cli_{rl}_"))
        overrides = [f"experiment={args.experiment}", f"rl={rl}", f"trainer.max_steps={args.steps}",
                     f"task.max_new_tokens={args.new_tokens}", "task.checkpoints=false",
                     "trainer.enable_progress_bar=false", *args.set]
        try:
            m, wall = run_cli(overrides, REPO, run_dir)
        except SystemExit as e:
            rows.append({"bench": "grpo_cli", "overrides": overrides, "error": str(e)[-800:]})
            print(rows[-1], flush=True)
            continue
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        sec = m["seconds"]
        row = {"bench": "grpo_cli", "overrides": overrides, "wall_s": round(wall, 2), "steps": m["steps"],
               "eval_seconds": m.get("eval_seconds"),
               "seconds": {k: sec[k] for k in ("fit", "rollout", "old_logprobs", "update", "eval", "warm_start",
                                               "engine_warmup") if k in sec},
               "seconds_per_step": round(sec["fit"] / max(1, m["steps"]), 3),
               **{k: m[k] for k in KEYS if k in m}}
        rows.append(row)
        print(row, flush=True)
    append_results(rows)
    print(f"\n{'overrides':<60}{'fit s':>8}{'rollout':>9}{'old-lp':>8}{'update':>8}{'eval':>8}{'tok/s':>9}{'k3':>10}")
    for r in rows:
        if "error" in r:
            print(f"{' '.join(r['overrides'][1:3]):<60} ERROR")
            continue
        s = r["seconds"]
        print(f"{' '.join(o for o in r['overrides'] if not o.startswith(('experiment', 'trainer.enable'))):<60.60}"
              f"{s['fit']:>8.1f}{s['rollout']:>9.1f}{s['old_logprobs']:>8.2f}{s['update']:>8.2f}{s['eval']:>8.2f}"
              f"{r.get('rollout_tokens_per_s', 0):>9.0f}{r.get('mismatch_k3_mean', float('nan')):>10.2e}")


if __name__ == "__main__":
    main()
