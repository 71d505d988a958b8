"""The train/rollout mismatch story as one sweep: GRPO on the synthetic task from the same SFT warm start, clean vs an
injected engine mismatch x {no correction, TIS, MIS} x {no replay, R3}, several seeds (conf/experiment/grpo_mismatch).

    python benchmarks/mismatch_story.py run --out story --seeds 0 1 2 --parallel 16   # CPU jobs, 1 thread each
    python benchmarks/mismatch_story.py report story                                  # story.md, story.png

``run`` starts ``python -m mtrain experiment=grpo_mismatch ...`` once per (config, seed), ``--parallel`` at a time,
each in ``<out>/<config>_s<seed>``. ``report`` reads every job's ``metrics.json`` and ``csv/metrics.csv`` and writes
``<out>/story.md`` (per config: final held-out accuracy per seed and its mean, the gap to the clean run, mean k3,
routing disagreement of the trained tokens and of the trainer's own routers, ESS, masked fraction) and
``<out>/story.png`` (training reward and held-out accuracy vs step, mean over seeds, one line per config).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NOISE = 0.1  # router-logit noise std (--noise): 5-10% of per-layer routing decisions differ on the demo's warm starts


def configs(noise: float = NOISE) -> dict[str, list[str]]:
    return {
        "clean": ["task.inject_mismatch.router_noise=0"],
        **{f"noisy_{rr}_{cm}": [f"task.inject_mismatch.router_noise={noise}", f"task.routing_replay={rr}",
                                f"task.rollout_correction.mode={cm}"]
           for rr in ("off", "r3") for cm in ("off", "token_tis", "token_mask")},
    }


CONFIGS = configs()
LABELS = {"clean": "clean (no mismatch)", "noisy_off_off": "mismatch, no correction", "noisy_off_token_tis": "TIS",
          "noisy_off_token_mask": "MIS (token mask)", "noisy_r3_off": "R3", "noisy_r3_token_tis": "R3 + TIS",
          "noisy_r3_token_mask": "R3 + MIS"}


def run(out: Path, seeds: list[int], parallel: int, extra: list[str], noise: float = NOISE,
        names: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def one(job):
        name, seed, overrides = job
        cmd = [sys.executable, "-m", "mtrain", "experiment=grpo_mismatch", "trainer=cpu", f"seed={seed}", *overrides,
               *extra, f"hydra.run.dir={out / name}"]
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"{name}: rc={rc}", flush=True)
        return rc

    jobs = [(f"{c}_s{s}", s, o) for s in seeds for c, o in configs(noise).items() if names is None or c in names]
    with ThreadPoolExecutor(parallel) as pool:
        failed = sum(rc != 0 for rc in pool.map(one, jobs))
    if failed:
        raise SystemExit(f"{failed} of {len(jobs)} jobs failed; see {out}/*.log")


def _history(d: Path) -> list[dict]:
    return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(open(d / "csv" / "metrics.csv"))]


def k3_trend(history: list[dict]) -> tuple[float, float]:
    """Mean k3 of the first and of the last quarter of a run's steps (nan where none was measured)."""
    k3 = [r["mismatch/k3"] for r in history if "mismatch/k3" in r and r["mismatch/k3"] == r["mismatch/k3"]]
    q = len(k3) // 4
    if q == 0:
        return float("nan"), float("nan")
    return sum(k3[:q]) / q, sum(k3[-q:]) / q


def report(out: Path, noise: float = NOISE) -> Path:
    runs: dict[str, dict[int, tuple[dict, list[dict]]]] = {}
    for d in sorted(p for p in out.iterdir() if (p / "metrics.json").is_file()):
        config, seed = d.name.rsplit("_s", 1)
        runs.setdefault(config, {})[int(seed)] = (json.loads((d / "metrics.json").read_text()), _history(d))
    if "clean" not in runs:
        raise SystemExit(f"{out}: no clean_s<seed> runs; run the sweep first")

    def mean(xs):
        xs = [x for x in xs if x is not None and x == x]  # (bypass: no mismatch measured)
        return sum(xs) / len(xs) if xs else float("nan")

    clean = {s: m["val_accuracy"] for s, (m, _) in runs.get("clean", {}).items()}
    lines = ["| config | held-out accuracy per seed (warm start -> end) | mean end | vs clean | seeds >= 10 pts below "
             "clean | k3 mean | k3 first -> last quarter of the steps, per seed | seeds with k3 rising (>= 2x) | "
             "routing disagr. trained | routing disagr. own | ESS | masked |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        if config not in runs:
            continue
        seeds = sorted(runs[config])
        ms = [runs[config][s][0] for s in seeds]
        per_seed = ", ".join(f"s{s}: {100 * m['val_accuracy_before']:.0f}->{100 * m['val_accuracy']:.1f}"
                             for s, m in zip(seeds, ms))
        gaps = [100 * (m["val_accuracy"] - clean[s]) for s, m in zip(seeds, ms) if s in clean]
        below = sum(g <= -10 for g in gaps)
        trends = [k3_trend(runs[config][s][1]) for s in seeds]
        rising = sum(last >= 2 * first and last > 1e-6 for first, last in trends)  # (nan compares False)
        trend = ", ".join(f"s{s}: {first:.1e}->{last:.1e}" for s, (first, last) in zip(seeds, trends))
        lines.append(
            f"| {LABELS[config]} | {per_seed} | {100 * mean([m['val_accuracy'] for m in ms]):.1f}% | "
            f"{mean(gaps):+.1f} pts | {below}/{len(gaps)} | {mean([m.get('mismatch_k3_mean', float('nan')) for m in ms]):.2e} | "
            f"{trend} | {rising}/{len(seeds)} | "
            f"{100 * mean([m.get('mismatch_routing_disagreement_mean', float('nan')) for m in ms]):.2f}% | "
            f"{100 * mean([m.get('mismatch_routing_disagreement_own_mean', float('nan')) for m in ms]):.2f}% | "
            f"{mean([m.get('correction_ess_mean', float('nan')) for m in ms]):.4f} | "
            f"{100 * mean([m.get('correction_frac_masked_mean', 0.0) for m in ms]):.2f}% |")
    md = out / "story.md"
    md.write_text("# GRPO under an injected train/rollout mismatch (router-logit noise std "
                  f"{noise})\n\n" + "\n".join(lines) + "\n")
    _figure(out, runs)
    print(md.read_text())
    return md


def _figure(out: Path, runs) -> None:
    from mtrain.plots import figure

    with figure(out / "story.png", size=(12, 4), ncols=3) as (a1, a2, a3):
        for config in CONFIGS:
            if config not in runs:
                continue
            hs = [h for _, h in runs[config].values()]
            n = min(len(h) for h in hs)
            steps = [hs[0][i]["step"] for i in range(n)]
            style = {"lw": 2.0 if config == "clean" else 1.2, "ls": "-" if "r3" in config or config == "clean" else "--"}
            reward = [sum(h[i]["reward/mean"] for h in hs) / len(hs) for i in range(n)]
            a1.plot(steps, _smooth(reward), label=LABELS[config], **style)
            k3 = [sum(h[i].get("mismatch/k3", 0.0) for h in hs) / len(hs) for i in range(n)]
            a3.plot(steps, _smooth(k3), label=LABELS[config], **style)
            evals = [r for r in hs[0] if "val/accuracy" in r]
            if evals:
                xs = [r["step"] for r in evals]
                ys = [sum(next(r["val/accuracy"] for r in h if r.get("step") == x and "val/accuracy" in r)
                          for h in hs) / len(hs) for x in xs]
                a2.plot(xs, ys, marker="o", ms=3, label=LABELS[config], **style)
        a1.set_title("training reward (mean over seeds, smoothed)", fontsize=9)
        a2.set_title("held-out greedy accuracy (mean over seeds)", fontsize=9)
        a3.set_title("train/rollout k3 of each step's batch", fontsize=9)
        for a in (a1, a2, a3):
            a.set_xlabel("RL step")
            a.grid(alpha=0.3)
        a2.legend(fontsize=7)


def results_rows(out: Path, noise: float, card: str, command: str) -> None:
    """Append one ``mismatch_story`` row per job of ``out`` to benchmarks/results.jsonl (and $OUT)."""
    from benchmarks.common import append_results

    rows = []
    for d in sorted(p for p in out.iterdir() if (p / "metrics.json").is_file()):
        config, seed = d.name.rsplit("_s", 1)
        m, history = json.loads((d / "metrics.json").read_text()), _history(d)
        first, last = k3_trend(history)
        rows.append({"bench": "mismatch_story", "card": card, "router_noise": noise, "command": command,
                     "config": config, "seed": int(seed), "val_accuracy_before": m.get("val_accuracy_before"),
                     "val_accuracy": m.get("val_accuracy"), "mismatch_k3_mean": m.get("mismatch_k3_mean"),
                     "k3_first_quarter": first, "k3_last_quarter": last,
                     "routing_disagreement_mean": m.get("mismatch_routing_disagreement_mean"),
                     "routing_disagreement_own_mean": m.get("mismatch_routing_disagreement_own_mean"),
                     "correction_ess_mean": m.get("correction_ess_mean"), "wall_s": m.get("wall_s")})
    append_results(rows)


def _smooth(xs: list[float], k: int = 10) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--parallel", type=int, default=1)
    r.add_argument("--noise", type=float, default=NOISE, help="router-logit noise std of the noisy configs")
    r.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="a subset of the configs (default: all)")
    r.add_argument("extra", nargs="*", help="more overrides for every job")
    p = sub.add_parser("report")
    p.add_argument("out", type=Path)
    p.add_argument("--noise", type=float, default=NOISE, help="the noise the run used (for the title)")
    p.add_argument("--rows", metavar="CARD", help="also append a results row per job, naming the machine it ran on")
    p.add_argument("--command", default="", help="with --rows: the run command, for the rows")
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.out, a.seeds, a.parallel, a.extra, a.noise, a.configs)
        report(a.out, a.noise)
    else:
        report(a.out, a.noise)
        if a.rows:
            results_rows(a.out, a.noise, a.rows, a.command)
