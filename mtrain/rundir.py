"""A Hydra callback that checks, before Hydra creates it, that the run (or sweep) dir can be created: a path under a
file, a read-only file system or a folder without write permission gets one line and exit 2, not a traceback.

Nothing is created here: Hydra resolves ``${now:...}`` again when it makes the dir, so the check walks up to the
nearest existing ancestor and asks whether a folder can be made in it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def unwritable(path: str | os.PathLike) -> Optional[str]:
    """Why ``path`` cannot be created or written to, or None if it can."""
    p = Path(path).expanduser().absolute()
    if p.exists():
        if not p.is_dir():
            return f"{p} is a file, not a folder"
        return None if os.access(p, os.W_OK | os.X_OK) else f"{p} is not writable"
    ancestor = p.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, so {p} cannot be created under it"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable (read-only file system or no permission), so {p} cannot be created"
    return None


class RunDirCheck(Callback):
    def _check(self, config: DictConfig, key: str) -> None:
        path = OmegaConf.select(config, key)
        problem = unwritable(path) if path else None
        if problem:
            print(f"mtrain: error: {key}: {problem}. Fix: point {key}=... at a writable folder", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
