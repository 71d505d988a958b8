"""Expert load balancing on the default job: ``python -m mtrain`` (GLM4-MoE, seed 0) without balancing, with the
load-balancing loss and with the aux-loss-free bias update, each run as a user runs it; MaxVio at the end of the run
and the accuracy each reaches.

    python benchmarks/routing_balance.py --card "2-core CPU (the development machine), torch 2.14.1"
    python benchmarks/routing_balance.py --card ... --variants none bias --set trainer.max_steps=300

MaxVio = (max load - mean load) / mean load of an MoE layer's experts, averaged over the MoE layers, from the token
counts the run logged: ``final`` is the last logging window (10 steps x 128 examples), ``last10`` the mean of the
last 10 windows (the last 100 steps). Prints a table and appends one ``routing_balance`` row per variant to
benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import append_results, run_cli  # noqa: E402

VARIANTS = {
    "none": [],
    "aux": ["model.routing.load_balancing=aux"],  # transformers' form, coefficient 1e-3 (Qwen3-MoE's default)
    "aux_1e-2": ["model.routing.load_balancing=aux", "model.routing.aux_loss_coef=1e-2"],
    "seq_aux": ["model.routing.load_balancing=seq_aux"],
    "bias": ["model.routing.bias_update=true"],  # rate 1e-3 (DeepSeek-V3's)
    "bias_1e-4": ["model.routing.bias_update=true", "model.routing.bias_update_rate=1e-4"],
    "aux_1e-4": ["model.routing.load_balancing=aux", "model.routing.aux_loss_coef=1e-4"],
    # no balancing, the peak lr 1% off: how far accuracy moves when the trajectory changes for another reason
    "none_lr-1%": ["task.lr=2.97e-3"],
    "none_lr+1%": ["task.lr=3.03e-3"],
    "bias+seq_aux_1e-4": ["model.routing.bias_update=true", "model.routing.load_balancing=seq_aux",
                          "model.routing.aux_loss_coef=1e-4"],  # DeepSeek-V3 / GLM-4.5's recipe
}


def maxvio_windows(run_dir: Path) -> list[float]:
    """MaxVio (mean over MoE layers) of every logged window, from the run's expert_load.csv."""
    by_step: dict[int, list[float]] = {}
    with (run_dir / "expert_load.csv").open() as f:
        for row in csv.DictReader(f):
            load = [float(v) for k, v in row.items() if k.startswith("expert")]
            mean = sum(load) / len(load)
            by_step.setdefault(int(row["step"]), []).append((max(load) - mean) / mean if mean else 0.0)
    return [sum(v) / len(v) for _, v in sorted(by_step.items())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--card", required=True, help="the machine, in words, for the rows")
    p.add_argument("--variants", nargs="+", default=["none", "aux", "bias"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seed=S of each run (0: the default job)")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (e.g. trainer.max_steps=300)")
    p.add_argument("--figure", help="write MaxVio against the step of every run to this PNG")
    a = p.parse_args()
    rows, runs = [], {}
    print("| variant | overrides | MaxVio final | MaxVio last 10 windows | dead experts | val loss | accuracy | wall |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for seed, name in [(s, v) for s in a.seeds for v in a.variants]:
        overrides = [*VARIANTS[name], *(["seed=" + str(seed)] if seed else []), *a.set]
        run_dir = Path(tempfile.mkdtemp()) / "run"
        m, wall = run_cli(overrides, REPO, run_dir)
        windows = maxvio_windows(run_dir)
        runs[f"{name}, seed {seed}"] = run_dir
        tail = windows[-10:]
        r = {"bench": "routing_balance", "card": a.card, "variant": name, "seed": seed,
             "command": f"python -m mtrain {' '.join(overrides)}".strip(), "steps": m["steps"],
             "maxvio_final": round(m["routing_maxvio"], 4), "maxvio_last10": round(sum(tail) / len(tail), 4),
             "maxvio_first": round(windows[0], 4), "dead_expert_frac": m["routing_dead_expert_frac"],
             "routing_entropy": round(m["routing_entropy"], 4), "aux_loss": round(m["routing_aux_loss"], 4),
             "val_loss": round(m["val_loss"], 4), "val_accuracy": m["val_accuracy"],
             "train_loss_last": round(m["train_loss_last"], 4), "tokens_per_expert": m["routing"]["tokens_per_expert"],
             "command_wall_s": round(wall, 1)}
        if "expert_bias" in m["routing"]:
            r["expert_bias"] = m["routing"]["expert_bias"]
        rows.append(r)
        print(f"| {name} | `{' '.join(overrides)}` | {r['maxvio_final']:.3f} | {r['maxvio_last10']:.3f} | "
              f"{100 * r['dead_expert_frac']:.0f}% | {r['val_loss']:.4f} | {100 * r['val_accuracy']:.1f}% | "
              f"{wall:.0f} s |", flush=True)
    append_results(rows)
    if a.figure:
        plot_runs(runs, Path(a.figure))


def plot_runs(runs: dict[str, Path], path: Path, every: int = 10) -> None:
    """MaxVio (mean over MoE layers) of each logged window against the step, one line per run."""
    from mtrain.plots import figure

    with figure(path, size=(7, 4)) as ax:
        for label, run_dir in runs.items():
            w = maxvio_windows(run_dir)
            ax.plot([every * (i + 1) for i in range(len(w))], w, lw=1.2, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("MaxVio (mean over MoE layers)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("python -m mtrain (GLM4-MoE, 8 experts, top-2): the experts' load", fontsize=9)


if __name__ == "__main__":
    main()
