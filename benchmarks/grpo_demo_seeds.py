"""The GRPO demo across seeds and variants: ``experiment=grpo_demo rl=on`` on the CPU, one thread per job.

    python benchmarks/grpo_demo_seeds.py --out /tmp/seeds --parallel 16 >> benchmarks/results.jsonl

Each job of :data:`VARIANTS` x seeds runs in ``<out>/<variant>_s<seed>``; then one ``grpo_demo_seeds`` results row per
job is printed (held-out greedy accuracy before/after and its curve, the warm start's steps, wall seconds) and a table
on stderr: mean end accuracy per variant and its gap to ``grpo``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FORMAT = "task.reward=benchmarks.grpo_rewards.format_and_exact"
VARIANTS = {
    "grpo": [],  # the preset: group baseline, std-normalised, exact-match reward
    "reinforce": ["task.advantage=reinforce"],  # no baseline: the raw 0/1 reward
    "grpo_format": [FORMAT],  # a reward with an offset: 0.5 for digits + 0.5 for the exact answer
    "reinforce_format": [FORMAT, "task.advantage=reinforce"],
    "grpo_p64": ["task.prompts_per_step=64"],  # half the rollouts a step
}


def run(out: Path, seeds: list[int], parallel: int, extra: list[str] = (), variants: list[str] | None = None,
        done=lambda row: None) -> list[dict]:
    """All jobs, ``parallel`` at a time; ``done(row)`` is called as each job ends (rows survive a cut-off run)."""
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(job):
        name, seed, overrides = job
        d = out / f"{name}_s{seed}"
        cmd = [sys.executable, "-m", "mtrain", "experiment=grpo_demo", "rl=on", "trainer=cpu", f"seed={seed}",
               "task.export=false", "task.checkpoint_every_n_steps=1000", *overrides, *extra, f"hydra.run.dir={d}"]
        with open(f"{d}.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        m = json.loads((d / "metrics.json").read_text()) if rc == 0 else {}
        row = {"variant": name, "seed": seed, "rc": rc, "overrides": overrides,
               **{k: m.get(k) for k in ("val_accuracy_before", "val_accuracy", "val_accuracy_curve", "warm_start",
                                        "wall_s", "reward_mean_last10")}}
        done(row)
        return row

    jobs = [(name, s, o) for name, o in VARIANTS.items() if not variants or name in variants for s in seeds]
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, jobs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="a subset of the variants (default: all)")
    ap.add_argument("--card", default=f"CPU ({os.cpu_count()} cores, 1 thread per job), {platform.machine()}")
    ap.add_argument("extra", nargs="*", help="more overrides for every job (e.g. trainer.max_steps=2 for a smoke test)")
    a = ap.parse_args()
    date = datetime.date.today().isoformat()
    stamp = {"date": date, "card": a.card, "bench": "grpo_demo_seeds", "extra": a.extra}
    rows = run(a.out, a.seeds, a.parallel, a.extra, a.variants, done=lambda r: print(json.dumps(stamp | r), flush=True))
    ends = {}
    for r in rows:
        ends.setdefault(r["variant"], []).append(r["val_accuracy"])
    base = ends.get("grpo")
    for name, acc in ends.items():
        if None in acc:
            print(f"{name:18s} failed jobs: see {a.out}/{name}_s*.log", file=sys.stderr)
            continue
        gap = "" if base is None or None in base else f"  vs grpo {100 * (sum(acc) - sum(base)) / len(acc):+.1f} pts"
        ends_pct = " ".join(f"{100 * x:.1f}" for x in acc)
        print(f"{name:18s} end accuracy {ends_pct}  mean {100 * sum(acc) / len(acc):.1f}%{gap}", file=sys.stderr)


if __name__ == "__main__":
    main()
