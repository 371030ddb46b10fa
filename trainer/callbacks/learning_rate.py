"""On resume, the learning rate of the config wins over the checkpoint's."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


def peak_lrs(optimizer: Any) -> list[float]:
    """Each param group's peak learning rate: what an LR scheduler scales (``initial_lr``), else its ``lr``."""
    return [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]


def _schedulers_of(scheduler: Any) -> list[Any]:
    """``scheduler`` and those it chains (SequentialLR, ChainedScheduler)."""
    inner = getattr(scheduler, "_schedulers", None) or []
    return [scheduler, *(s for child in inner for s in _schedulers_of(child))]


def _show(values: list[float]) -> str:
    distinct = list(dict.fromkeys(values))
    return f"{distinct[0]:g}" if len(distinct) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


class ConfiguredLearningRate(pl.Callback):
    """Lightning restores the optimizers' param groups and the LR schedulers from a checkpoint, learning rates
    included, so a run resumed with a lower ``task.optimizer.lr`` would go on with the old one. This callback
    notes each param group's peak learning rate as ``configure_optimizers`` built it from the config
    (``on_fit_start``, after the optimizers are built and before Lightning restores their states) and, once
    they are restored (``on_train_start``), puts the configured peak back wherever it differs from the
    checkpoint's: ``initial_lr`` and the schedulers' ``base_lrs`` take the new value and the current ``lr`` is
    scaled by new / old, so the schedule keeps its position (warmup, cosine). The log says so in one line per
    optimizer. Where the config's value equals the checkpoint's nothing is touched, so resume stays exact.

    Only the learning rate: betas, eps and weight decay come from the checkpoint as Lightning restores them.
    """

    def __init__(self) -> None:
        self._configured: list[list[float]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._configured = [peak_lrs(optimizer) for optimizer in trainer.optimizers]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, (optimizer, configured) in enumerate(zip(trainer.optimizers, self._configured, strict=False)):
            restored = peak_lrs(optimizer)
            if restored == configured or len(restored) != len(configured):
                continue
            for group, new, old in zip(optimizer.param_groups, configured, restored, strict=True):
                if new == old:
                    continue
                group["lr"] = group["lr"] * (new / old) if old else new
                if "initial_lr" in group:
                    group["initial_lr"] = new
            for config in trainer.lr_scheduler_configs:
                for scheduler in _schedulers_of(config.scheduler):
                    if getattr(scheduler, "optimizer", None) is not optimizer:
                        continue
                    if len(getattr(scheduler, "base_lrs", ())) == len(configured):
                        scheduler.base_lrs = list(configured)
                    if hasattr(scheduler, "_last_lr"):
                        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            if trainer.is_global_zero:
                which = f" (optimizer {index})" if len(trainer.optimizers) > 1 else ""
                log.info(
                    "resuming with lr %s instead of the checkpoint's %s%s; the schedule keeps its position: lr now %s",
                    _show(configured),
                    _show(restored),
                    which,
                    _show([group["lr"] for group in optimizer.param_groups]),
                )
        self._configured = []
