"""Throughput, data-wait and memory metrics for the dashboards."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch


def batch_size_of(batch: Any) -> int:
    """Samples in a batch of ours: the leading size of its image, latents or token tensor."""
    if isinstance(batch, dict):
        for name in ("image", "latents", "tokens"):
            value = batch.get(name)
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return int(batch[0].shape[0])
    return 0


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Throughput(pl.Callback):
    """Every ``log_every_n_steps`` logs, averaged over the batches since the last log:

    - ``perf/samples_per_sec``: all ranks together; ``perf/samples_per_sec_per_device`` for one rank
      (images/s for the image stages; for the LDM on cached latents, latents/s);
    - ``perf/step_time``: seconds per batch, from one batch's start to the next one's;
    - ``perf/data_wait_fraction``: the share of that time spent waiting for the data loader (between the
      end of one batch and the start of the next); near 0 means the GPUs, not the data, set the pace;
    - ``perf/peak_memory_gb``: CUDA peak allocation, or the process's peak RSS on CPU.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self._reset()
        self._last_end: float | None = None
        self._batch_start = 0.0

    def _reset(self) -> None:
        self._samples, self._batches, self._busy, self._wait = 0, 0, 0.0, 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None  # the first batch of an epoch waits for new workers: not counted

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += now - self._last_end
        self._batch_start = now

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        now = time.perf_counter()
        counted = self._last_end is not None
        self._last_end = now
        if not counted:
            return
        self._busy += now - self._batch_start
        self._samples += batch_size_of(batch)
        self._batches += 1
        every = self.log_every_n_steps or max(trainer.log_every_n_steps, 1)
        if trainer.global_step % every != 0 or self._busy <= 0:
            return
        elapsed = self._busy + self._wait
        per_device = self._samples / elapsed
        pl_module.log_dict(
            {
                "perf/samples_per_sec": per_device * trainer.world_size,
                "perf/samples_per_sec_per_device": per_device,
                "perf/step_time": elapsed / self._batches,
                "perf/data_wait_fraction": self._wait / elapsed,
                "perf/peak_memory_gb": peak_memory_gb(pl_module.device),
            },
            on_step=True,
            on_epoch=False,
        )
        self._reset()
