"""Skip optimizer steps whose gradients are not finite; stop the run after too many in a row."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

from trainer.errors import NonFiniteTrainingError

log = logging.getLogger(__name__)


class NonFiniteGuard(pl.Callback):
    """Before every optimizer step, checks that all gradients are finite (a NaN or inf loss makes them
    so too). A bad step is skipped: the gradients are dropped, so the optimizer leaves the weights and
    its moments alone (the LR schedule still advances). Skipped steps are counted and logged as
    ``train/skipped_steps``; after ``max_consecutive`` bad steps in a row the run stops with
    :class:`~trainer.errors.NonFiniteTrainingError`, before any checkpoint of the bad state is written,
    so the last checkpoint is the last good one.

    Under DDP the gradients are already averaged, so all ranks decide alike; with sharded strategies
    (FSDP) the ranks agree through one all-reduce. With ``16-mixed`` precision the grad scaler's own
    overflow steps (the first few while the scale settles) are counted here too.
    """

    def __init__(self, max_consecutive: int = 20) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)).item())
        if trainer.world_size > 1 and not isinstance(trainer.strategy, pl.strategies.DDPStrategy):
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        log.warning(
            "step %d: non-finite loss or gradients, optimizer step skipped (%d in a row, %d in all)",
            trainer.global_step,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"training stopped at step {trainer.global_step}: {self.consecutive} consecutive steps with a "
                f"non-finite loss or gradients. The last checkpoint in {trainer.default_root_dir} was written before "
                "them. Lower the learning rate, set gradient clipping (trainer.gradient_clip_val, or "
                "task.grad_clip for the autoencoder), prefer bf16-mixed to 16-mixed, or look for broken inputs."
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.consecutive = state_dict["skipped"], state_dict["consecutive"]
