"""Save and requeue on a preemption signal (SLURM's ``--signal=USR1@120``, or ``scancel --signal=USR1``).

The signal handler only raises a flag; the checkpoint is written at the next step boundary, where
the state is consistent, with every rank taking part (one boolean all-reduce per step tells all
ranks that any of them was signalled). Then, under SLURM, rank 0 runs ``scontrol requeue
$SLURM_JOB_ID`` and the run stops; the requeued job starts in the same run folder (named after the
job id) and ``resume=auto`` picks the checkpoint up. Outside SLURM the run saves and stops.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class Preemption(pl.Callback):
    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGUSR1",), requeue: bool = True) -> None:
        self.signals = [getattr(signal, name) if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.preempted = False
        self.checkpoint_path: Path | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # acted on at the next step boundary

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        signalled = self.received is not None
        if trainer.world_size > 1:
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled or self.preempted:
            return
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        directory = Path(trainer.default_root_dir) / "checkpoints"
        self.checkpoint_path = directory / f"preempt-step{trainer.global_step:08d}.ckpt"
        log.warning("%s received: saving %s", name, self.checkpoint_path)
        trainer.save_checkpoint(self.checkpoint_path)
        self.preempted = True
        trainer.should_stop = True
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero:
            job = os.environ.get("SLURM_ARRAY_JOB_ID", job)
            if "SLURM_ARRAY_TASK_ID" in os.environ:
                job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                log.warning("requeued SLURM job %s; it resumes from %s", job, self.checkpoint_path)
            else:
                log.error("scontrol requeue %s failed (%s): resume by hand", job, result.stderr.strip())
