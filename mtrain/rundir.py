"""The run dir of a job: that it can be created, and that one job at a time works in it.

:class:`RunDirCheck`, a Hydra callback, checks before Hydra creates the run (or sweep) dir that it can: a path under a
file, a read-only file system or a folder without write permission gets one line and exit 2, not a traceback.

:func:`claim` makes the job the run dir's only user: an exclusive ``flock`` on ``<run dir>/.mtrain.lock``, held
until the process ends (the OS drops it however the process ends, ``kill -9`` included, so a resume is never
blocked by a dead job), which names the job holding it (pid, host, start time). A single run claims its dir before
Hydra writes anything into it (``on_run_start``: ``${now:...}`` is resolved once and cached, so this is the dir Hydra
then makes); a job of a sweep claims its own dir when it starts (``mtrain.cli``) and lets go when it ends. Of a job
with several processes (torchrun, SLURM tasks, Lightning's launcher), rank 0 holds it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mtrain.config import ConfigError

log = logging.getLogger("mtrain")

LOCK_FILE = ".mtrain.lock"
_HELD: dict[Path, int] = {}  # run dir -> the open lock file this process holds
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")  # torchrun, Lightning's launcher, SLURM


class RunDirBusy(ConfigError):
    """Another job holds the run dir; the message names it."""


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


def rank_zero(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether this process is rank 0 of its job (every process of a single-process job is)."""
    env = os.environ if environ is None else environ
    return all(env.get(var, "0") in ("", "0") for var in RANK_VARS)


def _holder(lock: Path) -> str:
    for _ in range(20):  # the holder writes its line right after taking the lock
        text = lock.read_text(errors="replace").strip() if lock.exists() else ""
        if text:
            return text
        time.sleep(0.05)
    return "a job that has not said which yet"


def claim(run_dir: str | os.PathLike) -> None:
    """Make this process's job the only one in ``run_dir`` until it ends (or :func:`release`), or raise
    :class:`RunDirBusy` naming the job that holds it. A no-op when this process holds it already, and on ranks
    other than 0. A file system without ``flock`` gets a warning and no lock."""
    d = Path(run_dir).absolute()
    if d in _HELD or not rank_zero():
        return
    d.mkdir(parents=True, exist_ok=True)
    lock = d / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(f"run dir {d} is in use by another job ({_holder(lock)}); wait for it to end, or choose "
                         "another hydra.run.dir") from None
    except OSError as e:
        os.close(fd)
        log.warning("run dir %s: cannot lock %s (%s); nothing stops another job from using the same dir", d, LOCK_FILE,
                    e)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
             .encode())
    _HELD[d] = fd


def release(run_dir: str | os.PathLike) -> None:
    """Let go of ``run_dir`` if this process holds it (closing the lock file drops the lock; the file stays)."""
    fd = _HELD.pop(Path(run_dir).absolute(), None)
    if fd is not None:
        os.close(fd)


def _exit(msg: str) -> None:
    print(f"mtrain: error: {msg}", file=sys.stderr)
    sys.exit(2)


class RunDirCheck(Callback):
    def _check(self, config: DictConfig, key: str) -> Optional[str]:
        path = OmegaConf.select(config, key)
        problem = unwritable(path) if path else None
        if problem:
            _exit(f"{key}: {problem}. Fix: point {key}=... at a writable folder")
        return path

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = self._check(config, "hydra.run.dir")
        if path:
            try:
                claim(path)
            except RunDirBusy as e:
                _exit(str(e))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            release(config.hydra.runtime.output_dir)  # the next job of this process works in another dir
