"""Lightning's ModelCheckpoint, holding back while the non-finite guard reports an open streak."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from trainer.callbacks.nan_guard import NonFiniteGuard

log = logging.getLogger(__name__)


class GuardedCheckpoint(ModelCheckpoint):
    """:class:`~pytorch_lightning.callbacks.ModelCheckpoint` (every option as there) that writes nothing while the
    run's :class:`~trainer.callbacks.nan_guard.NonFiniteGuard` reports an open streak of skipped non-finite steps:
    a save that falls inside one (every ``every_n_train_steps``, ``train_time_interval``, epoch end, validation
    end, ``last.ckpt``) is deferred to the first good step after it, and none is written on the exception that
    stops the run (``save_on_exception``) nor, for the streak, at the end of training. So the newest checkpoint
    predates the streak and ``resume=auto`` picks it up. Without a guard among the callbacks it is ModelCheckpoint.

    Its state in a checkpoint goes under ModelCheckpoint's key, so checkpoints written before it existed resume
    with their best/last paths."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred = False  # a save fell inside a streak

    @property
    def state_key(self) -> str:
        own = super().state_key
        return ModelCheckpoint.__qualname__ + own[len(type(self).__qualname__) :]

    @staticmethod
    def _guard(trainer: pl.Trainer) -> NonFiniteGuard | None:
        return next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)

    def _held(self, trainer: pl.Trainer) -> bool:
        guard = self._guard(trainer)
        if guard is None or not guard.streak_open:
            return False
        if not self._deferred and trainer.is_global_zero:
            log.warning(
                "step %d: checkpoint held back (%d consecutive non-finite steps); it is written at the first good step",
                trainer.global_step,
                guard.consecutive,
            )
        self._deferred = True
        return True

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if not self._held(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        if not self._held(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _should_save_on_exception(self, trainer: pl.Trainer) -> bool:
        guard = self._guard(trainer)
        return super()._should_save_on_exception(trainer) and not (guard is not None and guard.streak_open)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self._deferred and not self._held(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._deferred = False
            monitor_candidates = self._monitor_candidates(trainer)
            if self.monitor is not None and self.monitor not in monitor_candidates:
                self._defer_save_until_validation = True  # as ModelCheckpoint does for a metric not logged yet
            else:
                super()._save_topk_checkpoint(trainer, monitor_candidates)
                super()._save_last_checkpoint(trainer, monitor_candidates)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._deferred and trainer.is_global_zero:
            log.warning(
                "training ended during consecutive non-finite steps: the checkpoint held back was not written, the "
                "newest one predates them"
            )
