"""``trainer=fsdp`` through the CLI: compiled against eager decoder layers, and 1 -> N GPUs, per-GPU tokens/s in the
loop, as a user runs it (``torchrun --standalone --nproc_per_node N -m mtrain trainer=fsdp trainer.devices=N ...``).

    python benchmarks/fsdp_cli.py --gpus 2             # Qwen3-30B-A3B shape, 4 layers, 4 x 2048 tokens per GPU, rl=on
    python benchmarks/fsdp_cli.py --worlds 1           # one world size only (both compile settings)
    python benchmarks/fsdp_cli.py --smoke              # tiny model, CPU/gloo, 1 and 2 processes: checks the script
    python benchmarks/fsdp_cli.py --set trainer.fsdp_reshard_after_forward=false   # more overrides for every job

Each case is one CLI job with the ``sft_cli.py`` job's overrides plus ``trainer=fsdp`` (``bf16-mixed``: fp32 master
weights sharded, bf16 compute, fp32 gradient reduce) and ``task.checkpoints=false`` (the distributed checkpoint of
fp32 weights and AdamW moments would only add minutes of writing that ``tokens_per_s_steady`` does not count anyway).
Weak scaling: every GPU gets ``data.batch_size`` sequences a step. Read from ``metrics.json``: ``tokens_per_s_steady``
(per process, training steps after the first) and the last logging window's ``train/tokens_per_s`` from
``csv/metrics.csv`` (what a long run settles at). Prints a table, the compile speed-up per world size and the scaling
efficiency per compile setting; appends one ``fsdp_cli`` row per case to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import append_results, card, run_cli  # noqa: E402
from benchmarks.sft_cli import GPU, SMOKE  # noqa: E402

FSDP = ["trainer=fsdp", "task.checkpoints=false", "trainer.val_check_interval=1000"]
SMOKE_FSDP = [*FSDP, "trainer.accelerator=cpu", "trainer.precision=32-true"]


def case(world: int, compiled: bool, steps: int, smoke: bool, extra: list[str]) -> dict:
    base = [*SMOKE, *SMOKE_FSDP] if smoke else [*GPU, *FSDP]
    overrides = [*base, f"trainer.devices={world}", f"task.compile={str(compiled).lower()}",
                 f"trainer.max_steps={steps}", *extra]
    run_dir = Path(tempfile.mkdtemp()) / "run"
    m, wall = run_cli(overrides, REPO, run_dir, nproc=world)
    assert m["world_size"] == world, m["world_size"]
    with open(run_dir / "csv" / "metrics.csv") as f:  # train/tokens_per_s: one value per log_every_n_steps window
        windows = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    return {"world": world, "compile": compiled, "tok_s_per_gpu": m["tokens_per_s_steady"], "seconds": m["seconds"],
            "tok_s_last_window": windows[-1] if windows else None, "job_wall_s": round(wall, 1),
            "train_loss_first": m["train_loss_first"], "overrides": " ".join(overrides)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=2, help="N: compare 1 GPU with N GPUs")
    p.add_argument("--worlds", type=int, nargs="+", help="world sizes to run (default: 1 and --gpus)")
    p.add_argument("--compile", choices=["both", "on", "off"], default="both")
    p.add_argument("--steps", type=int, default=30, help="training steps per job (the first is not timed)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU (gloo)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more CLI overrides for every job, e.g. trainer.fsdp_reshard_after_forward=false")
    a = p.parse_args()
    worlds = a.worlds or sorted({1, a.gpus})
    if a.smoke:
        a.steps = min(a.steps, 4)
    elif torch.cuda.device_count() < max(worlds):
        sys.exit(f"needs {max(worlds)} CUDA devices (or --smoke)")
    compiles = {"both": [False, True], "on": [True], "off": [False]}[a.compile]
    runs = []
    for world in worlds:
        for compiled in compiles:
            r = case(world, compiled, a.steps, a.smoke, a.set)
            runs.append(r)
            print(f"{world} GPU(s), compile={compiled}: {r['tok_s_per_gpu']:,.0f} tokens/s per GPU after the first "
                  f"step, {r['tok_s_last_window'] or 0:,.0f} in the last logging window; job {r['job_wall_s']:.0f} s; "
                  f"seconds {r['seconds']}", flush=True)
    by = {(r["world"], r["compile"]): r["tok_s_per_gpu"] for r in runs}
    for r in runs:
        eager, one = by.get((r["world"], False)), by.get((1, r["compile"]))
        r["compile_speedup"] = round(r["tok_s_per_gpu"] / eager, 3) if r["compile"] and eager else None
        r["scaling_efficiency"] = round(r["tok_s_per_gpu"] / one, 3) if r["world"] > 1 and one else None
        extra = "".join(f", {k} {r[k]:.3f}" for k in ("compile_speedup", "scaling_efficiency") if r[k] is not None)
        print(f"  {r['world']} GPU(s) compile={r['compile']}: {r['tok_s_per_gpu']:,.0f}{extra}")
    if not a.no_save and not a.smoke:
        append_results([{"bench": "fsdp_cli", "gpus": r["world"], "compile": r["compile"], "steps": a.steps,
                         "tok_s_per_gpu": round(r["tok_s_per_gpu"]), "compile_speedup": r["compile_speedup"],
                         "tok_s_last_window": r["tok_s_last_window"] and round(r["tok_s_last_window"]),
                         "scaling_efficiency": r["scaling_efficiency"], "train_loss_first": r["train_loss_first"],
                         "cli_seconds": r["seconds"], "job_wall_s": r["job_wall_s"], "overrides": r["overrides"],
                         "card": card()} for r in runs])


if __name__ == "__main__":
    main()
