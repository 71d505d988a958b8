"""Task registry: ``cfg.task.name`` -> ``"module:function"``, imported lazily.

Each function is ``run(cfg: DictConfig) -> dict`` (final metrics). The CLI calls it with the prepared config
(``mtrain.config.prepare_run``: resolved, precision decided and recorded under ``cfg.precision``), after saving it to
``<run dir>/config_resolved.yaml``. Add a task: one line here and ``conf/task/<name>.yaml`` with ``name: <name>``.
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
}


def get_task(name: str) -> Callable[[Any], dict]:
    """The ``run`` function of task ``name``; ConfigError when unknown."""
    try:
        target = TASKS[name]
    except KeyError:
        raise ConfigError(f"task.name={name!r} is not a registered task; known: {', '.join(sorted(TASKS))}") from None
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)
