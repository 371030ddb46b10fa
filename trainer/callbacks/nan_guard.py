"""Skip optimizer steps whose gradients are not finite, or whose norm is a spike far above its running average;
stop the run after too many non-finite steps in a row."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch

from trainer.errors import NonFiniteTrainingError

log = logging.getLogger(__name__)


class NonFiniteGuard(pl.Callback):
    """Before every optimizer step, measures the total norm of the gradients (before gradient clipping; under
    ``16-mixed``, unscaled, except for fused AdamW, which unscales in its step: then it includes the loss scale,
    whose twofold changes the spike check shrugs off) and skips the step when

    - the norm is not finite (a NaN or inf loss makes it so too): the gradients are dropped, so the optimizer
      leaves the weights and its moments alone (the LR schedule still advances). These steps are counted and
      logged as ``train/skipped_steps``; after ``max_consecutive`` of them in a row the run stops with
      :class:`~trainer.errors.NonFiniteTrainingError`. While such a streak is open
      :class:`~trainer.callbacks.checkpoint.GuardedCheckpoint` writes no checkpoint, so the newest one predates it;
    - the norm exceeds ``spike_factor`` times its running average, once ``spike_warmup`` finite steps have been
      seen: the one step that blows the weights up usually has finite gradients, and the non-finite steps only
      follow it. Counted and logged as ``train/spike_steps``. The running average is an exponential moving
      average (``spike_beta``: about the last 100 steps), started at the first norm, into which every norm enters
      clamped to ``spike_factor`` times the average: one spike (in the warmup too) moves it at most
      ``1 + (1 - spike_beta) * (spike_factor - 1)``-fold (twofold with the defaults), and a lasting change of
      scale is absorbed after a few skipped steps (with the defaults 4 for a 1000-fold jump, 7 for 10^4-fold)
      instead of being skipped for ever. ``spike_factor=null`` turns this off. Not caught: a slow divergence, a
      spike below the factor, anything in the first ``spike_warmup`` steps, and spikes that gradient clipping
      done before the optimizer step has already capped (the autoencoder's ``task.grad_clip``;
      ``trainer.gradient_clip_val`` clips after this check).

    A training step with several optimizer steps (the autoencoder's generator and discriminator) is one bad step
    when any of them is non-finite; a spike is judged per optimizer, each with its own running average. A spike
    step neither ends nor extends a non-finite streak.

    Under DDP the gradients are already averaged, so all ranks decide alike; with sharded strategies (FSDP) the
    ranks sum their squared norms in one all-reduce. With ``16-mixed`` precision the grad scaler's own overflow
    steps (the first few while the scale settles) are counted here too, and a skipped step still lets the scaler
    see its gradients, so an overflow lowers the scale as it would without the guard.

    The counts and the running averages travel with the checkpoint; a resumed run starts with no open streak.
    """

    def __init__(
        self,
        max_consecutive: int = 20,
        spike_factor: float | None = 100.0,
        spike_warmup: int = 100,
        spike_beta: float = 0.99,
    ) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {max_consecutive}")
        if spike_factor is not None and spike_factor <= 1:
            raise ValueError(f"spike_factor must be above 1 (or null: off), got {spike_factor}")
        if spike_warmup < 1:
            raise ValueError(f"spike_warmup must be at least 1, got {spike_warmup}")
        if not 0 < spike_beta < 1:
            raise ValueError(f"spike_beta must be in (0, 1), got {spike_beta}")
        self.max_consecutive = max_consecutive
        self.spike_factor = spike_factor
        self.spike_warmup = spike_warmup
        self.spike_beta = spike_beta
        self.skipped = 0  # training steps with a non-finite loss or gradients
        self.consecutive = 0  # ... in a row, up to the last one
        self.spikes = 0  # training steps with a gradient-norm spike
        self.norm_average: list[float] = []  # running average of the gradient norm, per optimizer
        self.norm_count: list[int] = []  # finite norms seen, per optimizer
        self.peak_ratio = 0.0  # the largest norm / average judged (after the warmup) in this process
        self.streak_start: int | None = None  # global step of the first step of the open streak
        self.last_saved_step: int | None = None  # global step of the newest checkpoint written or resumed from
        self._batch_step = 0
        self._consecutive_before = 0
        self._batch_bad = False
        self._batch_spiked = False

    @property
    def streak_open(self) -> bool:
        """Whether the newest training step was skipped as non-finite (a checkpoint now would hold the
        position after steps that were not applied)."""
        return self.consecutive > 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._batch_step = trainer.global_step
        self._consecutive_before = self.consecutive
        self._batch_bad = self._batch_spiked = False

    def _total_norm(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> float | None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        sharded = trainer.world_size > 1 and not isinstance(trainer.strategy, pl.strategies.DDPStrategy)
        if not grads and not sharded:
            return None
        # one device-to-host copy per step, as the finiteness check alone needs
        norm = (
            torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else torch.zeros((), device=pl_module.device)
        )
        if sharded:  # each rank holds a shard of the gradients (an inf or NaN anywhere makes the sum so)
            norm = trainer.strategy.reduce(norm.float().square(), reduce_op="sum").sqrt()
        return float(norm)

    @staticmethod
    def _drop_gradients(trainer: pl.Trainer, optimizer: Any) -> None:
        """Skip ``optimizer``'s step by dropping its gradients. Under ``16-mixed`` the grad scaler must still see
        them: Lightning unscales them before this hook (which records whether they overflowed) except for optimizers
        that unscale in their own step (fused AdamW, our default on CUDA); for those, unscale here, or the scaler
        finds no gradients to check and its update fails ("No inf checks were recorded")."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            from torch.amp.grad_scaler import OptState

            if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
                scaler.unscale_(optimizer)  # an overflow still lowers the scale, as without the guard
        optimizer.zero_grad(set_to_none=True)

    def _optimizer_index(self, trainer: pl.Trainer, optimizer: Any) -> int:
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        while len(self.norm_average) <= index:
            self.norm_average.append(0.0)
            self.norm_count.append(0)
        return index

    def _is_spike(self, index: int, norm: float) -> tuple[bool, float, float]:
        """Judge ``norm`` against optimizer ``index``'s running average, then fold it in; (spike, ratio, average)."""
        average, count = self.norm_average[index], self.norm_count[index]
        self.norm_count[index] = count + 1
        if self.spike_factor is None:
            return False, 0.0, average
        if count == 0 or average <= 0:  # the first norm (or all zero so far) starts the average
            self.norm_average[index] = norm
            return False, 0.0, average
        ratio = norm / average
        spike = count >= self.spike_warmup and ratio > self.spike_factor
        if count >= self.spike_warmup:
            self.peak_ratio = max(self.peak_ratio, ratio)
        entering = min(norm, self.spike_factor * average)  # one spike moves the average at most twofold
        self.norm_average[index] = self.spike_beta * average + (1 - self.spike_beta) * entering
        return spike, ratio, average

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        norm = self._total_norm(trainer, pl_module, optimizer)
        if norm is None:
            return
        index = self._optimizer_index(trainer, optimizer)
        if math.isfinite(norm):
            spike, ratio, average = self._is_spike(index, norm)
            if not spike:
                if not (self._batch_bad or self._batch_spiked):
                    self.consecutive = 0
                return
            self._drop_gradients(trainer, optimizer)
            if not (self._batch_bad or self._batch_spiked):
                self.spikes += 1
                self.consecutive = self._consecutive_before  # neither ends nor extends a streak
            self._batch_spiked = True
            log.warning(
                "step %d: gradient norm %.3g is %.0f times its running average %.3g (task.optimizer.lr too high, or "
                "a broken batch?), optimizer step skipped (%d spikes in all)",
                self._batch_step,
                norm,
                ratio,
                average,
                self.spikes,
            )
            return
        self._drop_gradients(trainer, optimizer)
        if self._batch_bad:  # this training step is counted already (another of its optimizers)
            return
        self._batch_bad = True
        self.skipped += 1
        self.consecutive = self._consecutive_before + 1
        if self.consecutive == 1:
            self.streak_start = self._batch_step
        log.warning(
            "step %d: non-finite loss or gradients, optimizer step skipped (%d in a row, %d in all)",
            self._batch_step,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(self._stop_message(trainer))

    def _stop_message(self, trainer: pl.Trainer) -> str:
        start = self.streak_start if self.streak_start is not None else self._batch_step
        saved = self.last_saved_step
        if saved is None:
            checkpoint = "No checkpoint was written before them."
        elif saved <= start:
            checkpoint = f"The newest checkpoint (step {saved}) predates them."
        else:
            checkpoint = (
                f"The newest checkpoint (step {saved}) was written during them; its weights are those of step "
                f"{start}, as skipped steps change none."
            )
        return (
            f"training stopped at step {self._batch_step}: {self.consecutive} consecutive steps (from step {start}) "
            f"with a non-finite loss or gradients, none of them applied. {checkpoint} Lower task.optimizer.lr (a "
            "resumed run takes the new value), clip gradients (trainer.gradient_clip_val, or task.grad_clip for the "
            "autoencoder), prefer bf16-mixed to 16-mixed, or look for broken inputs; then resume with resume=auto "
            f"hydra.run.dir={trainer.default_root_dir}"
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self.spike_factor is not None:
            pl_module.log("train/spike_steps", float(self.spikes), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.last_saved_step = trainer.global_step
        if self.streak_open and trainer.is_global_zero:
            log.warning(
                "the checkpoint of step %d is written during %d consecutive non-finite steps: its weights are those "
                "of step %s (skipped steps change none), its data position and LR schedule are after them",
                trainer.global_step,
                self.consecutive,
                self.streak_start,
            )

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.last_saved_step = checkpoint.get("global_step")

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "spikes": self.spikes,
            "norm_average": list(self.norm_average),
            "norm_count": list(self.norm_count),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
        if state_dict.get("consecutive"):
            log.warning(
                "resuming from a checkpoint written during %d consecutive non-finite steps; "
                "the count starts again at 0",
                state_dict["consecutive"],
            )
        self.consecutive = 0  # a resumed run (with a lower lr, say) gets max_consecutive steps of its own
        self.spikes = state_dict.get("spikes", 0)  # checkpoints of older versions hold no spike statistics
        self.norm_average = [float(v) for v in state_dict.get("norm_average", [])]
        self.norm_count = [int(v) for v in state_dict.get("norm_count", [])]
