"""What ``task=grpo`` reports at its end: the final metrics (last step, accuracy before/after, the run's mismatch),
``reward_curve.png`` and ``mismatch_curve.png``, and the printed summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mtrain.job.records import pct
from mtrain.lit.grpo import GRPOModule
from mtrain.plots import figure


def summarize(lit: GRPOModule, steps: int) -> dict[str, Any]:
    """Final values: the last step's metrics, accuracy before/after, the run's mean/max mismatch."""
    h = lit.history
    out: dict[str, Any] = {"steps": steps}
    if lit.evals:
        out["val_accuracy_before"] = lit.evals[0][1]
        out["val_accuracy"] = lit.evals[-1][1]
        out["val_accuracy_curve"] = [[s, round(a, 4)] for s, a in lit.evals]
    if h:
        last = h[-1]
        for key in ("reward/mean", "reward/std", "accuracy", "frac_zero_std", "response_length/mean",
                    "response_length/max", "train/entropy", "train/clip_frac", "train/approx_kl", "train/grad_norm",
                    "lr", "rollout/tokens_per_s", "train/tokens_per_s"):
            if key in last:
                out[key.replace("/", "_")] = last[key]
        tail = h[-10:]
        out["reward_mean_last10"] = sum(r["reward/mean"] for r in tail) / len(tail)
        for key in ("mismatch/k3", "mismatch/routing_disagreement", "mismatch/routing_disagreement_own",
                    "mismatch/logprob_abs_diff_mean", "correction/ess", "correction/frac_masked",
                    "correction/frac_truncated", "correction/is_weight_mean"):
            values = [r[key] for r in h if key in r]
            if values:
                out[key.replace("/", "_") + "_mean"] = sum(values) / len(values)
        out["mismatch_logprob_abs_diff_max"] = max(r["mismatch/logprob_abs_diff_max"] for r in h)
        out["mismatch_routing_disagreement_max"] = max(r["mismatch/routing_disagreement"] for r in h)
    out["engine_syncs"] = lit.engine.syncs if lit.engine is not None else 0
    return out


def plot_curves(lit: GRPOModule, out: Path, title: str) -> dict[str, str]:
    h = lit.history
    if not h:
        return {}
    steps = [r["step"] for r in h]
    with figure(out / "reward_curve.png", size=(7, 4)) as ax:
        ax.plot(steps, [r["reward/mean"] for r in h], color="tab:blue", lw=1.2, label="reward (train, mean)")
        acc = [r["accuracy"] for r in h]
        if not all(math.isnan(a) for a in acc):
            ax.plot(steps, acc, color="tab:green", lw=0.8, alpha=0.6, label="exact match (train samples)")
        if lit.evals:
            xs, ys = zip(*lit.evals)
            ax.plot(xs, ys, "o-", color="tab:orange", ms=4, lw=1.6, label="exact match (held-out, greedy)")
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title, fontsize=9)
    with figure(out / "mismatch_curve.png", size=(9, 3.5), ncols=2) as (a1, a2):
        a1.plot(steps, [r["mismatch/k3"] for r in h], color="tab:red", lw=1.2)
        a1.set_title("train/rollout KL (k3) of each step's batch", fontsize=9)
        a2.plot(steps, [100 * r["mismatch/routing_disagreement"] for r in h], color="tab:purple", lw=1.2)
        a2.set_title("routing disagreement (%)", fontsize=9)
        for a in (a1, a2):
            a.set_xlabel("RL step")
            a.grid(alpha=0.3)
    return {"reward_curve": str(out / "reward_curve.png"), "mismatch_curve": str(out / "mismatch_curve.png")}


def print_summary(m: dict[str, Any]) -> None:
    acc = f"held-out accuracy {pct(m.get('val_accuracy_before'))} -> {pct(m.get('val_accuracy'))}"
    mis = (f"mismatch k3 mean {m.get('mismatch_k3_mean', 0):.2e}, routing disagreement mean "
           f"{100 * m.get('mismatch_routing_disagreement_mean', 0):.2f}%")
    print(f"\nmtrain grpo: {m['steps']} RL steps in {m['wall_s']:.0f} s: reward {m.get('reward_mean_last10', 0):.3f} "
          f"(mean of last 10 steps), {acc}; {mis}")
    for key, value in (("run dir", m["files"]["run_dir"]), ("metrics", "metrics.json"),
                       ("curves", "reward_curve.png, mismatch_curve.png"), ("rollouts", "rollouts.jsonl"),
                       ("logs", "csv/metrics.csv" if m["files"].get("csv_log") else None),
                       ("HF model", "hf_model/" if m["files"].get("hf_model") else None)):
        if value:
            print(f"  {key:<12} {value}")
