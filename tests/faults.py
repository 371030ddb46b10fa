"""Fault injection for integration tests, importable by the training CLI in a subprocess when the tests
folder is on PYTHONPATH: ``+callbacks.kill._target_=faults.KillAtStep +callbacks.kill.step=4``."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process (every rank does the same) as the batch after optimizer step ``step`` begins,
    i.e. after the checkpoint of step ``step`` is on disk and before anything of the next step is."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(pl.Callback):
    """Send ``signum`` to this process at the start of the batch after optimizer step ``step`` (rank 0 only)."""

    def __init__(self, step: int, signum: str = "SIGUSR1") -> None:
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)
