"""Stop signals (SIGTERM, SIGUSR1, SLURM's requeue signals, Ctrl-C): end the step, checkpoint, record, exit."""

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

    Ctrl-C (SIGINT) stops the same way, at the end of the current step: a ``KeyboardInterrupt`` raised mid-step
    could land between the optimizer step and the step counter, the log row or the data position, and the checkpoint
    would not be a step boundary. A second Ctrl-C stops at once (``KeyboardInterrupt``; the last checkpoint written
    stays the one to resume from). A SIGINT the job inherited as ignored (a shell's background job) stays ignored.

    The handlers are installed at setup, before Lightning registers its own: Lightning's SLURM auto-requeue handler
    and submitit's (each would requeue without a checkpoint at the current step or mtrain's status record) stand
    aside. Lightning snapshots the handlers it finds (ours) and puts that snapshot back when the fit ends, however it
    ends; at the start of training the snapshot is told the handlers that were there before ours, so those come back
    after a failed or stopped fit too (``teardown`` restores them after a fit that ends normally). A signal that
    arrived while the model was set up (Lightning clears its stop flag when it registers) is re-applied then."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict[int, object] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.received = None
        if stage != "fit":
            return
        for name in requeue_signals():
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handler(trainer, name))
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handler(trainer, "SIGINT"))

    def _handler(self, trainer: L.Trainer, name: str):
        def handle(signum, frame) -> None:
            if name == "SIGINT" and self.received is not None:
                raise KeyboardInterrupt  # Ctrl-C with a stop already asked for: now
            hint = " (Ctrl-C again to stop now)" if name == "SIGINT" else ""
            log.warning("received %s: stopping after the current step, checkpoint at that step%s", name, hint)
            self.received = name
            trainer._signal_connector.received_sigterm = True  # Lightning's own stop path (SIGTERMException)
        return handle

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        connector = trainer._signal_connector
        connector._original_handlers.update(self._previous)  # what Lightning restores when the fit ends
        if self.received is not None:  # arrived before Lightning registered (and cleared its flag)
            connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            exception.mtrain_signal = self.received or "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            exception.mtrain_signal = "SIGINT"

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
