"""Task registry: ``cfg.task.name`` -> ``"module:function"``, imported lazily (``--cfg`` and ``task=info`` stay
fast: Lightning is imported only by the tasks that train or evaluate).

Each function is ``run(job: mtrain.job.Job) -> dict`` (final metrics). The CLI calls it with the prepared job
(config resolved, precision decided once and recorded under ``cfg.precision``, run dir), after saving the config to
``<run dir>/config_resolved.yaml``. Add a task: ``tasks/<name>.py`` (or a package ``tasks/<name>/``), its schema in
``mtrain/schema.py``, one line here and ``conf/task/<name>.yaml``. A task whose own settings can be checked without
Lightning names that check in :data:`CHECKS`: the CLI runs it before the task's module is imported.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from mtrain.config import ConfigError

TASKS: dict[str, str] = {
    "info": "mtrain.tasks.info:run",
    "sft": "mtrain.tasks.sft:run",
    "eval": "mtrain.tasks.eval:run",
    "mismatch": "mtrain.tasks.mismatch:run",
    "export": "mtrain.tasks.export:run",
    "grpo": "mtrain.tasks.grpo:run",
}

# the tasks that build data and a model (mtrain.job.start_job): the CLI checks their config before importing them
MODEL_TASKS = ("sft", "eval", "grpo")

# a task's own config check, ``check(job) -> None`` raising a one-line user error, importable without Lightning
CHECKS: dict[str, str] = {
    "grpo": "mtrain.tasks.grpo.checks:check_config",
}


def check_task(job: Any) -> None:
    """Run the config check of ``job``'s task, if it has one (:data:`CHECKS`)."""
    target = CHECKS.get(job.cfg.task.name)
    if target is not None:
        module, _, fn = target.partition(":")
        getattr(importlib.import_module(module), fn)(job)


def get_task(name: str) -> Callable[[Any], dict]:
    """The ``run`` function of task ``name``; ConfigError when unknown."""
    try:
        target = TASKS[name]
    except KeyError:
        raise ConfigError(f"task.name={name!r} is not a registered task; known: {', '.join(sorted(TASKS))}") from None
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)
