"""The README's default-job table: run ``python -m mtrain`` (and its rl=on and Qwen3 variants) as a user would, time
the whole command, read each run's ``metrics.json``.

    python benchmarks/default_job.py --card "2-core CPU (the development machine), torch 2.14.1"

Prints the table rows and appends one ``default_job`` row per command to benchmarks/results.jsonl (and $OUT).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import append_results, run_cli  # noqa: E402

COMMANDS = ["", "rl=on model=glm4_moe", "model=qwen3_moe"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--card", required=True, help="the machine, in words, for the rows")
    a = p.parse_args()
    rows = []
    for extra in COMMANDS:
        m, wall = run_cli(extra.split(), REPO, Path(tempfile.mkdtemp()) / "run")
        rows.append({"bench": "default_job", "card": a.card, "command": f"python -m mtrain {extra}".strip(),
                     "train_loss_first": round(m["train_loss_first"], 3), "train_loss_last": round(m["train_loss_last"], 3),
                     "val_loss": round(m["val_loss"], 4), "val_accuracy_before": m["val_accuracy_before"],
                     "val_accuracy": m["val_accuracy"], "command_wall_s": round(wall, 2)})
        r = rows[-1]
        print(f"| `{r['command']}` | {r['train_loss_first']:.3f} → {r['train_loss_last']:.3f} | {r['val_loss']:.3f} | "
              f"{100 * r['val_accuracy_before']:.1f}% → {100 * r['val_accuracy']:.1f}% | {wall:.0f} s |", flush=True)
    append_results(rows)


if __name__ == "__main__":
    main()
