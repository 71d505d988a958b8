"""``<run dir>/csv/metrics.csv`` that survives a resume in the same run dir.

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


class _KeepingWriter(ExperimentWriter):
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
            tmp = f"{self.metrics_file_path}.{os.getpid()}.tmp"
            with self._fs.open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._fs.mv(tmp, self.metrics_file_path)
        super().save()


class KeepingCSVLogger(CSVLogger):
    """Lightning's CSV logger; with ``keep=True`` (a resumed run) it continues the existing ``metrics.csv`` (see
    module doc) instead of deleting it."""

    def __init__(self, *args, keep: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep = keep

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.keep:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return super().experiment
