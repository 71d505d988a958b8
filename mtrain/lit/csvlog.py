"""``<run dir>/csv/metrics.csv``: one row per logged step, and it survives a resume in the same run dir.

Metrics logged for the same step by different callers (Lightning's ``train/loss``, a task's own rows, the routing
metrics of :mod:`mtrain.lit.routing`) share that step's row: a ``log_metrics`` call for the step of the previous row
joins it, also when that row already went to the file (it is rewritten once, at the next save).

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts, so a job that resumes its own run dir
(``task.ckpt_path=auto``, a requeued SLURM job) would keep only the curve after the resume. Here the earlier rows
stay: at the first write, the old file's rows before the first step logged now are kept (rows at or after it were
logged after the checkpoint the job resumed from, and are logged again; a row cut short by a killed write is
dropped), the new rows follow, under one header.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only


class _StepRowsWriter(ExperimentWriter):
    """Lightning's writer, with the metrics of consecutive calls for one step in one row (see module doc)."""

    _tail_step = None  # the step of the last row in the file

    def log_metrics(self, metrics_dict, step=None) -> None:
        if step is not None and self.metrics and self.metrics[-1].get("step") == step:
            before = self.metrics.pop()
            super().log_metrics(metrics_dict, step)
            self.metrics[-1] = before | self.metrics[-1]
            return
        super().log_metrics(metrics_dict, step)

    def save(self) -> None:
        if self.metrics and self._tail_step is not None and self.metrics[0].get("step") == self._tail_step \
                and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                rows = list(csv.DictReader(f))
            if rows and str(rows[-1].get("step")) == str(self._tail_step):  # the step's row: take it back
                tail = {k: v for k, v in rows.pop().items() if k is not None and v not in ("", None)}
                self.metrics[0] = tail | self.metrics[0]
                self._rewrite(rows)
        if self.metrics:
            self._tail_step = self.metrics[-1].get("step")
        super().save()

    def _rewrite(self, rows: list[dict]) -> None:
        """Replace the file with ``rows`` under the current header, atomically (a temporary file renamed over it)."""
        tmp = f"{self.metrics_file_path}.{os.getpid()}.tmp"
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        self._fs.mv(tmp, self.metrics_file_path)


class _KeepingWriter(_StepRowsWriter):
    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        self._previous: list[dict[str, str]] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                lines = f.read().splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # a row cut short by a killed write
            self._previous = list(csv.DictReader(lines))

    def save(self) -> None:
        if self._previous and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [{k: v for k, v in r.items() if k is not None} for r in self._previous
                    if str(r.get("step") or "").isdigit() and int(r["step"]) < first]
            self._previous = []
            if not kept:
                self._fs.rm_file(self.metrics_file_path)
                return super().save()
            self.metrics_keys = sorted(set(self.metrics_keys).union(*(r.keys() for r in kept)))
            self._rewrite(kept)
        super().save()


class KeepingCSVLogger(CSVLogger):
    """Lightning's CSV logger, one row per step; with ``keep=True`` (a resumed run) it continues the existing
    ``metrics.csv`` (see module doc) instead of deleting it."""

    def __init__(self, *args, keep: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep = keep

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and rank_zero_only.rank == 0:  # other ranks: Lightning's dummy
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = (_KeepingWriter if self.keep else _StepRowsWriter)(log_dir=self.log_dir)
        return super().experiment
