"""The run's loggers, from the ``logger`` config group: ``logger=csv`` (the default), ``tensorboard``, ``wandb``,
``mlflow``, or several at once (``logger=[csv,wandb]``; none: ``logger=[]``).

Every logger gets the step metrics. Every logger but CSV also gets the resolved config when the job starts (W&B's
config, MLflow's params, TensorBoard's hparams) and, at the job's end (:func:`finish_loggers`, called by
``mtrain.job.finish``), the final metrics of ``metrics.json`` as ``final/<name>`` and the plots the task wrote
(``<run dir>/*.png``: W&B images, MLflow artifacts under ``plots/``, TensorBoard images). CSV needs none of that:
its run dir holds ``config_resolved.yaml``, ``metrics.json`` and the PNGs.

A job that resumes into its own run dir (``task.ckpt_path=auto``, a requeued SLURM job) continues its W&B and
MLflow runs: their ids are kept in ``<run dir>/loggers.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib import image as mpimg
from omegaconf import DictConfig, OmegaConf

from mtrain.config import ConfigError
from mtrain.lit.csvlog import KeepingCSVLogger

log = logging.getLogger("mtrain")

IDS_FILE = "loggers.json"
_HINTS = {"wandb": "`wandb login`, or WANDB_MODE=offline",
          "mlflow": "check logger.mlflow.tracking_uri (or $MLFLOW_TRACKING_URI)"}
_LIVE: list[Logger] = []  # the loggers of this process's current job, closed by finish_loggers


def _csv(node: DictConfig, run_dir: Path, resume: bool, ids: dict) -> Logger:
    return KeepingCSVLogger(save_dir=str(run_dir), name="csv", version="", keep=resume)


def _tensorboard(node: DictConfig, run_dir: Path, resume: bool, ids: dict) -> Logger:
    return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False)


def _wandb(node: DictConfig, run_dir: Path, resume: bool, ids: dict) -> Logger:
    return WandbLogger(project=node.project, entity=node.entity, name=node.name or run_dir.name, group=node.group,
                       tags=list(node.tags) or None, offline=node.offline, save_dir=str(run_dir),
                       id=ids.get("id"), resume="allow" if ids.get("id") else None)


def _mlflow(node: DictConfig, run_dir: Path, resume: bool, ids: dict) -> Logger:
    import mlflow

    uri = node.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    run_id = ids.get("run_id") if ids.get("tracking_uri") == uri else None
    return MLFlowLogger(experiment_name=node.experiment_name, run_name=node.run_name or run_dir.name,
                        tracking_uri=uri, tags=dict(node.tags) or None, run_id=run_id)


BUILDERS: dict[str, Callable[[DictConfig, Path, bool, dict], Logger]] = {
    "csv": _csv, "tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}


def _ids(logger: Logger) -> dict[str, str]:
    if isinstance(logger, WandbLogger):
        return {"id": logger.experiment.id}
    if isinstance(logger, MLFlowLogger):
        return {"run_id": logger.run_id, "tracking_uri": logger._tracking_uri}
    return {}


def make_loggers(cfg: DictConfig, run_dir: Path, resume: bool = False) -> list[Logger]:
    """The loggers ``cfg.logger`` names, started (W&B run, MLflow run, TensorBoard writer) with the resolved config
    logged; ``resume``: the CSV log and the W&B/MLflow runs of ``run_dir`` continue. A logger that cannot start (not
    logged in, a tracking store it cannot open) is a :class:`ConfigError` naming it."""
    close_loggers("failed")  # a job of this process (multirun) that ended in an error, before finish_loggers
    selected = cfg.get("logger")
    if selected is None:  # a config composed without the group: what the default is
        selected = {"csv": {}}
    saved = _read_ids(run_dir) if resume else {}
    config = OmegaConf.to_container(cfg, resolve=True)
    loggers = []
    for name, node in selected.items():
        try:
            logger = BUILDERS[name](node, run_dir, resume, saved.get(name, {}))
            continued = isinstance(logger, MLFlowLogger) and logger._run_id is not None  # its params are set
            if name != "csv":
                logger.experiment  # noqa: B018  (starts it here, so a failure is this one line, before training)
                if not continued:
                    logger.log_hyperparams(config)
        except Exception as e:  # noqa: BLE001  (the package's own error, reported in one line)
            first = (str(e).strip().splitlines() or [""])[0]
            hint = f". Fix: {_HINTS[name]}" if name in _HINTS else ""
            raise ConfigError(f"logger={name} could not start: {type(e).__name__}: {first}{hint}") from e
        loggers.append(logger)
    _LIVE[:] = loggers
    if rank_zero_only.rank == 0 and any(_ids(lg) for lg in loggers):
        (run_dir / IDS_FILE).write_text(json.dumps({_name(lg): _ids(lg) for lg in loggers if _ids(lg)}) + "\n")
    return loggers


def _read_ids(run_dir: Path) -> dict[str, dict]:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _name(logger: Logger) -> str:
    for name, kind in (("csv", CSVLogger), ("tensorboard", TensorBoardLogger), ("wandb", WandbLogger),
                       ("mlflow", MLFlowLogger)):
        if isinstance(logger, kind):
            return name
    return type(logger).__name__


def csv_log(trainer: L.Trainer) -> Optional[str]:
    """``<run dir>/csv/metrics.csv`` when the CSV logger is on, else None."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return str(Path(logger.log_dir) / "metrics.csv")
    return None


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, keys joined with ``/``."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _numbers(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def _log_plot(logger: Logger, path: Path, step: int) -> None:
    key = f"plots/{path.stem}"
    if isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[str(path)], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path), "plots")
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, mpimg.imread(path), global_step=step, dataformats="HWC")


def _where(logger: Logger) -> str:
    if isinstance(logger, WandbLogger):
        return logger.experiment.url or logger.experiment.dir
    if isinstance(logger, MLFlowLogger):
        return f"{logger._tracking_uri} run {logger.run_id}"
    if isinstance(logger, CSVLogger):
        return str(Path(logger.log_dir) / "metrics.csv")
    return str(logger.log_dir)


def finish_loggers(run_dir: Path, metrics: dict[str, Any], rank_zero: bool = True) -> dict[str, str]:
    """The end of a job: the final metrics (``final/<name>``, at ``metrics["steps"]``) and ``<run dir>/*.png`` to
    every logger but CSV, then close them all. Returns where each logger's record is (name -> path, URL or run)."""
    loggers, where = list(_LIVE), {}
    if rank_zero:
        final = {f"final/{k}": v for k, v in _numbers({k: v for k, v in metrics.items() if k != "files"}).items()}
        step = int(metrics.get("steps") or 0)
        plots = sorted(Path(run_dir).glob("*.png"))
        for logger in loggers:
            where[_name(logger)] = _where(logger)
            if isinstance(logger, CSVLogger):
                continue  # its run dir holds metrics.json and the PNGs
            if isinstance(logger, TensorBoardLogger):  # the HParams tab: the config beside the final metrics
                logger.log_hyperparams(logger.hparams, metrics=final or None, step=step)
            elif final:
                logger.log_metrics(final, step=step)
            for path in plots:
                _log_plot(logger, path, step)
    close_loggers("success")
    return where


def close_loggers(status: str) -> None:
    """Finalize this process's loggers (``status``: success | failed); W&B's run ends with them."""
    loggers, _LIVE[:] = list(_LIVE), []
    for logger in loggers:
        try:
            logger.finalize(status)
            if isinstance(logger, WandbLogger):  # started by make_loggers (a no-op stand-in on other ranks)
                logger.experiment.finish(exit_code=0 if status == "success" else 1)
        except Exception as e:  # noqa: BLE001  (the job's outcome stands; a logger that cannot close says so)
            log.warning("logger %s could not close: %s", _name(logger), e)
