"""A console progress bar over the whole run's optimizer steps, with an ETA."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import _update_n


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps up to ``trainer.max_steps`` across epochs (streamed
    shards have no known epoch length, so a per-epoch bar could show neither a total nor an ETA). A resumed
    run starts the bar at its restored step. Without ``max_steps`` it falls back to Lightning's bar."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps > 0 and self.train_progress_bar is not None:
            bar = self.train_progress_bar
            bar.total = trainer.max_steps
            bar.initial = trainer.global_step  # rate and ETA from the steps of this epoch (or since a resume)
            _update_n(bar, trainer.global_step)
            bar.set_description(f"step (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            _update_n(bar, step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))
