"""Logs the data pipeline's skip counts (broken images, missing captions, bad shards, filtered)."""

from __future__ import annotations

import pytorch_lightning as pl

from trainer.data.pipeline import DataStats


class DataStatsLogger(pl.Callback):
    """Adds up the per-worker counts that batches carry and logs them, summed over ranks, as
    ``data/skipped_<reason>`` every ``log_every_n_steps`` steps."""

    def __init__(self) -> None:
        self.stats = DataStats()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "data_stats" in batch:
            self.stats.update(batch["data_stats"])
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            totals = {f"data/skipped_{reason}": float(n) for reason, n in self.stats.totals().items()}
            pl_module.log_dict(totals, on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=True)
