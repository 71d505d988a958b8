"""Stop signals (SIGTERM, SIGUSR1, SLURM's requeue signals): end the step, checkpoint, record, exit."""

from __future__ import annotations

import logging
import signal
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mtrain.parallel.launch import requeue_signals

log = logging.getLogger("mtrain")


class StopOnSignal(Callback):
    """SIGUSR1 (what SLURM sends ahead of a time limit or preemption with ``--signal=USR1@<s>``) -- and in a job
    started by submitit (``hydra/launcher=slurm``) submitit's own time-limit signal, SIGUSR2 -- stops the fit the way
    SIGTERM does: Lightning ends the current step and raises ``SIGTERMException``, :class:`LastCheckpoint` writes
    ``last.ckpt`` at that step, and the exception records which signal arrived (``mtrain_signal``) for the CLI's
    ``status.json``, the requeue and the exit code (128 + the signal's number).

    The handlers are installed at setup, before Lightning registers its own: Lightning's SLURM auto-requeue handler
    and submitit's (each would requeue without a checkpoint at the current step or mtrain's status record) stand
    aside. The previous handlers are restored at teardown."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict[int, object] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.received = None
        for name in requeue_signals():
            sig = getattr(signal, name, None)
            if sig is not None and stage == "fit":
                self._previous[sig] = signal.signal(sig, self._handler(trainer, name))

    def _handler(self, trainer: L.Trainer, name: str):
        def handle(signum, frame) -> None:
            log.info("received %s: stopping after the current step, checkpoint at that step", name)
            self.received = name
            trainer._signal_connector.received_sigterm = True  # Lightning's own stop path (SIGTERMException)
        return handle

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            exception.mtrain_signal = self.received or "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            exception.mtrain_signal = "SIGINT"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
