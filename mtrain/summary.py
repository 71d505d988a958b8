"""The multirun summary: ``<sweep dir>/summary.csv`` and ``summary.md``, one row per job.

A Hydra callback (``conf/hydra/default.yaml``, ``hydra.callbacks.sweep_summary``):

* ``on_job_end`` (every job, ok or failed) writes ``<job dir>/status.json`` -- job number, overrides, ``ok`` or
  ``failed`` with the error's first line -- and, in a multirun, rewrites the summary from every job dir so far;
* ``on_multirun_end`` rewrites it once more when the sweep ends.

Hydra calls ``on_multirun_end`` only when every job succeeded (after a failed job the sweeper re-raises its error
once all jobs of the batch ran), which is why each ``on_job_end`` also rewrites the summary: after the last job it
is complete either way. Metrics are the scalar values of each job's ``metrics.json`` (the union of their keys).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtrain.job.records import interruptions, write_json
from mtrain.rundir import RunDirBusy

log = logging.getLogger("mtrain")

STATUS_FILE = "status.json"
METRICS_FILE = "metrics.json"
FIXED = ["job", "overrides", "status", "error"]


def _error_line(e: BaseException) -> str:
    if e.__cause__ is not None and str(e.__cause__) == str(e):  # the CLI re-raises data/checkpoint errors as ConfigError
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _scalars(d: dict) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is None or isinstance(v, (bool, int, float, str))}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per job dir under ``sweep_dir`` (a dir holding ``.hydra/overrides.yaml``), sorted by job number.
    A job dir without ``status.json`` (killed, or still running) gets status ``unknown``."""
    rows = []
    for d in sorted(Path(sweep_dir).iterdir()):
        overrides_file = d / ".hydra" / "overrides.yaml"
        if not d.is_dir() or not overrides_file.is_file():
            continue
        status = _read_json(d / STATUS_FILE)
        if status is None:
            overrides = [str(o) for o in OmegaConf.load(overrides_file)]
            num = _job_num(d)
            status = {"job": num, "overrides": overrides, "status": "unknown", "error": ""}
        row = {
            "job": status.get("job"),
            "overrides": " ".join(status.get("overrides") or []),
            "status": status.get("status"),
            "error": status.get("error") or "",
        }
        if status.get("interruptions"):  # stopped (preempted, time limit) and resumed this many times
            row["interruptions"] = len(status["interruptions"])
        metrics = _read_json(d / METRICS_FILE) or {}
        row.update({k: v for k, v in _scalars(metrics).items() if k not in FIXED})
        row["dir"] = d.name
        rows.append(row)
    rows.sort(key=lambda r: (r["job"] is None, r["job"] if r["job"] is not None else 0, r["dir"]))
    return rows


def _job_num(d: Path) -> Optional[int]:
    hydra_file = d / ".hydra" / "hydra.yaml"
    try:
        return int(OmegaConf.load(hydra_file).hydra.job.num)
    except Exception:
        head = d.name.split("_", 1)[0]
        return int(head) if head.isdigit() else None


def _num(config: DictConfig) -> Optional[int]:
    try:
        num = OmegaConf.select(config, "hydra.job.num", default=None)
        return None if num is None else int(num)
    except Exception:
        return None


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(sweep_dir: str | os.PathLike) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write ``summary.csv`` (all values, full precision) and ``summary.md`` (a table, 4 significant digits)."""
    sweep = Path(sweep_dir)
    rows = collect(sweep)
    columns = list(FIXED)
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    csv_path, md_path = sweep / "summary.csv", sweep / "summary.md"
    _atomic_write(csv_path, buf.getvalue())
    n_failed = sum(r["status"] != "ok" for r in rows)
    lines = [f"# Sweep summary: {len(rows)} jobs, {len(rows) - n_failed} ok, {n_failed} not ok", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [_fmt(r.get(k)).replace("|", "\\|").replace("\n", " ") for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    _atomic_write(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path, rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class SweepSummary(Callback):
    """Hydra callback: ``status.json`` per job, ``summary.csv``/``summary.md`` per sweep (see module doc)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hc = config.hydra
        out = Path(hc.runtime.output_dir)
        failed = job_return.status != JobStatus.COMPLETED
        err = job_return._return_value if failed else None  # .return_value would re-raise the job's error
        if isinstance(err, RunDirBusy):
            return  # the dir is another job's: its status.json is that job's to write
        status = {
            "job": _num(config),
            "overrides": [str(o) for o in hc.overrides.task],
            "status": "failed" if failed else "ok",
            "error": _error_line(err) if isinstance(err, BaseException) else "",
        }
        try:
            past = interruptions(out / STATUS_FILE)  # a requeued job's earlier attempts
            if past:
                status["interruptions"] = past
            write_json(out / STATUS_FILE, status)
            if hc.mode == RunMode.MULTIRUN:
                csv_path, _, rows = write_summary(hc.sweep.dir)
                log.info("sweep summary (%d jobs so far): %s", len(rows), csv_path)
        except Exception as e:  # a summary problem must never fail a job
            log.warning("sweep summary: could not write (%s)", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir():
            return
        csv_path, md_path, rows = write_summary(sweep)
        n_ok = sum(r["status"] == "ok" for r in rows)
        print(f"\nmtrain sweep: {len(rows)} jobs, {n_ok} ok; summary: {csv_path} and {md_path.name}")
