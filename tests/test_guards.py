"""The non-finite guard (with its gradient-spike check), the checkpoints it holds back, the configured learning
rate on resume, throughput metrics and the progress bar, in-process with tiny models."""

from __future__ import annotations

import logging
import math
import signal
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import training_cli, write_shards
from trainer.callbacks.checkpoint import GuardedCheckpoint
from trainer.callbacks.learning_rate import ConfiguredLearningRate
from trainer.callbacks.nan_guard import NonFiniteGuard
from trainer.callbacks.preemption import Preemption
from trainer.callbacks.throughput import Throughput, batch_size_of
from trainer.errors import NonFiniteTrainingError
from trainer.tasks.optimization import adamw_with_schedule, build_adamw, warmup_cosine

ADAMW = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}


class Regression(pl.LightningModule):
    """Linear regression whose loss is NaN at the global steps in ``bad_steps`` and multiplied by ``scale`` at
    those in ``scaled_steps`` (finite gradients, ``scale`` times larger). With ``schedule``, AdamW and the LR
    schedule are built as the tasks build them."""

    def __init__(
        self,
        bad_steps: set[int],
        scaled_steps: set[int] = frozenset(),
        scale: float = 1e4,
        lr: float = 0.1,
        schedule: dict | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_steps, self.scaled_steps, self.scale = bad_steps, scaled_steps, scale
        self.lr, self.schedule, self.fused = lr, schedule, fused
        self.weights_seen: dict[int, torch.Tensor] = {}
        self.lrs_seen: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        self.weights_seen[self.global_step] = self.layer.weight.detach().clone()
        self.lrs_seen[self.global_step] = self.trainer.optimizers[0].param_groups[0]["lr"]
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.global_step in self.bad_steps:
            loss = loss * float("nan")
        if self.global_step in self.scaled_steps:
            loss = loss * self.scale
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.schedule is None:
            return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=self.fused)
        return adamw_with_schedule(self.parameters(), {**ADAMW, "lr": self.lr}, self.schedule, self.trainer.max_steps)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)


def checkpointer(tmp_path: Path, **options) -> GuardedCheckpoint:
    options = {"filename": "step{step:03d}", "auto_insert_metric_name": False, "save_top_k": -1, **options}
    return GuardedCheckpoint(dirpath=tmp_path / "checkpoints", **options)


def fit(
    model: pl.LightningModule,
    tmp_path: Path,
    guard: NonFiniteGuard,
    steps: int = 8,
    callbacks: list | None = None,
    ckpt_path: Path | None = None,
) -> pl.Trainer:
    if callbacks is None:
        callbacks = [pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2)]
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=steps,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path, name="", version=""),
        callbacks=[guard, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, train_dataloaders=data(), ckpt_path=ckpt_path)
    return trainer


def saved_steps(folder: Path) -> dict[str, int]:
    return {p.name: torch.load(p, weights_only=True)["global_step"] for p in sorted(folder.glob("*.ckpt"))}


def test_non_finite_steps_are_skipped_counted_and_training_goes_on(tmp_path: Path) -> None:
    model = Regression(bad_steps={2, 3})
    guard = NonFiniteGuard(max_consecutive=3)
    fit(model, tmp_path, guard)
    seen = model.weights_seen
    # steps 2 and 3 changed nothing (the optimizer skipped them), the others did
    assert torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[4])
    assert not torch.equal(seen[1], seen[2]) and not torch.equal(seen[4], seen[5])
    assert torch.isfinite(model.layer.weight).all()
    assert guard.skipped == 2 and guard.consecutive == 0
    logged = (tmp_path / "metrics.csv").read_text()
    assert "train/skipped_steps" in logged


def test_too_many_consecutive_bad_steps_stop_with_the_newest_checkpoint_from_before_them(tmp_path: Path) -> None:
    model = Regression(bad_steps=set(range(5, 100)))
    # every 2 steps, and on the exception that stops the run: neither may write the state after the bad steps
    callbacks = [checkpointer(tmp_path, every_n_train_steps=2, save_last=True, save_on_exception=True)]
    with pytest.raises(NonFiniteTrainingError) as raised:
        fit(model, tmp_path, NonFiniteGuard(max_consecutive=3), steps=20, callbacks=callbacks)
    message = str(raised.value)
    assert "3 consecutive steps (from step 5)" in message and "\n" not in message
    assert "The newest checkpoint (step 4) predates them" in message
    assert f"hydra.run.dir={tmp_path}" in message
    # steps 5, 6, 7 were the bad ones; the save due after step 5 was held back, and none came on the exception
    assert saved_steps(tmp_path / "checkpoints") == {"last.ckpt": 4, "step002.ckpt": 2, "step004.ckpt": 4}
    newest = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in newest["state_dict"].values())


def test_a_checkpoint_due_during_a_streak_is_written_at_the_first_good_step(tmp_path: Path, caplog) -> None:
    guard = NonFiniteGuard(max_consecutive=10)
    with caplog.at_level(logging.WARNING, logger="trainer.callbacks.checkpoint"):
        fit(
            Regression(bad_steps={3, 4, 5}),
            tmp_path,
            guard,
            steps=10,
            callbacks=[checkpointer(tmp_path, every_n_train_steps=2, save_last=True)],
        )
    # due after steps 3 (global step 4) and 5 (6): held back, and written once, after the good step 6
    assert saved_steps(tmp_path / "checkpoints") == {
        "last.ckpt": 10,
        "step002.ckpt": 2,
        "step007.ckpt": 7,
        "step008.ckpt": 8,
        "step010.ckpt": 10,
    }
    assert "checkpoint held back (1 consecutive non-finite steps)" in caplog.text
    assert guard.skipped == 3 and guard.consecutive == 0


def test_the_guarded_checkpoint_keeps_modelcheckpoints_state_key(tmp_path: Path) -> None:
    """So the state of a run folder's older checkpoints (ModelCheckpoint's) is picked up on resume."""
    options = {"dirpath": tmp_path, "every_n_train_steps": 4, "monitor": "val/loss", "mode": "min"}
    assert GuardedCheckpoint(**options).state_key == pl.callbacks.ModelCheckpoint(**options).state_key


class Preempt(pl.Callback):
    """Raise the preemption callback's flag, as its signal handler does, as the batch of ``step`` begins."""

    def __init__(self, preemption: Preemption, step: int) -> None:
        self.preemption, self.step = preemption, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.preemption.received = signal.SIGUSR1


class Record(pl.Callback):
    """What the guard, the optimizers and the schedulers hold when training starts (after a resume restored them)."""

    def __init__(self, guard: NonFiniteGuard | None = None) -> None:
        self.guard, self.at_start = guard, {}

    def on_train_start(self, trainer, pl_module):
        self.at_start = {
            "groups": [
                [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in trainer.optimizers
            ],
            "base_lrs": [list(config.scheduler.base_lrs) for config in trainer.lr_scheduler_configs],
        }
        if self.guard is not None:
            self.at_start["consecutive"] = self.guard.consecutive


def test_a_preemption_save_during_a_streak_says_what_it_holds_and_a_resume_counts_afresh(
    tmp_path: Path, caplog
) -> None:
    preemption = Preemption(requeue=False)
    guard = NonFiniteGuard(max_consecutive=3)
    model = Regression(bad_steps={3, 4})
    with caplog.at_level(logging.WARNING):
        fit(model, tmp_path, guard, steps=10, callbacks=[preemption, Preempt(preemption, 4)])
    assert preemption.preempted and guard.consecutive == 2
    path = tmp_path / "checkpoints" / "preempt-step00000005.ckpt"
    saved = torch.load(path, weights_only=True)
    assert saved["callbacks"][guard.state_key]["consecutive"] == 2
    assert torch.equal(saved["state_dict"]["layer.weight"], model.weights_seen[3])  # the weights before the streak
    assert "the checkpoint of step 5 is written during 2 consecutive non-finite steps" in caplog.text
    assert "its weights are those of step 3" in caplog.text

    caplog.clear()
    resumed = NonFiniteGuard(max_consecutive=3)
    record = Record(resumed)
    with caplog.at_level(logging.WARNING):
        fit(Regression(bad_steps={5}), tmp_path / "resumed", resumed, steps=10, callbacks=[record], ckpt_path=path)
    assert record.at_start["consecutive"] == 0  # not 2, so one more bad step (5) does not make 3 and stop the run
    assert "the count starts again at 0" in caplog.text
    assert resumed.skipped == 3 and resumed.consecutive == 0


# -- gradient-norm spikes ----------------------------------------------------------------------------------------


def test_a_gradient_norm_spike_is_skipped_counted_and_logged(tmp_path: Path) -> None:
    model = Regression(bad_steps=set(), scaled_steps={12})
    guard = NonFiniteGuard(spike_warmup=5)
    fit(model, tmp_path, guard, steps=16, callbacks=[])
    seen = model.weights_seen
    assert torch.equal(seen[12], seen[13])  # skipped: the weights stay
    assert not torch.equal(seen[11], seen[12]) and not torch.equal(seen[13], seen[14])
    assert guard.spikes == 1 and guard.skipped == 0 and guard.consecutive == 0
    assert guard.peak_ratio > 100
    assert "train/spike_steps" in (tmp_path / "metrics.csv").read_text()


def test_a_lasting_change_of_scale_is_absorbed_and_a_spike_in_the_warmup_is_not_judged(tmp_path: Path) -> None:
    model = Regression(bad_steps=set(), scaled_steps={2} | set(range(10, 40)))
    guard = NonFiniteGuard(spike_warmup=5)
    fit(model, tmp_path, guard, steps=40, callbacks=[])
    seen = model.weights_seen
    assert not torch.equal(seen[2], seen[3])  # the spike at step 2, in the warmup, was applied
    skipped = [step for step in range(10, 39) if torch.equal(seen[step], seen[step + 1])]
    # the first steps of the new scale are skipped (a jump of about 3000-fold: 6 of them), then it is the new normal
    assert guard.spikes == len(skipped) and 1 <= len(skipped) <= 8 and skipped == list(range(10, 10 + len(skipped)))


def test_healthy_training_sees_no_spike_and_spike_factor_null_turns_the_check_off(tmp_path: Path) -> None:
    guard = NonFiniteGuard(spike_warmup=5)
    fit(Regression(bad_steps=set()), tmp_path / "healthy", guard, steps=40, callbacks=[])
    assert guard.spikes == 0 and 0 < guard.peak_ratio < 10
    off = NonFiniteGuard(spike_factor=None, spike_warmup=5)
    fit(Regression(bad_steps=set(), scaled_steps={12}), tmp_path / "off", off, steps=16, callbacks=[])
    assert off.spikes == 0 and off.peak_ratio == 0


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_steps_under_16_mixed_leave_the_grad_scaler_working(tmp_path: Path, fused: bool) -> None:
    """Fused AdamW (the default on CUDA) unscales in its own step, so Lightning does not unscale before the guard
    looks: dropping the gradients made the scaler's update fail ("No inf checks were recorded prior to update")."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    model = Regression(bad_steps={5}, scaled_steps={12}, scale=1e3, fused=fused)  # 1e4 would overflow fp16
    guard = NonFiniteGuard(spike_factor=10, spike_warmup=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)  # no overflow of its own: only steps 5 and 12 are bad
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=16,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[guard],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    trainer.fit(model, train_dataloaders=data())
    seen = model.weights_seen
    assert torch.equal(seen[5], seen[6]) and torch.equal(seen[12], seen[13])
    assert not torch.equal(seen[6], seen[7]) and not torch.equal(seen[13], seen[14])
    assert guard.skipped == 1 and guard.spikes == 1
    assert scaler.get_scale() == 0.5  # the NaN step lowered the scale, as it does without the guard


def test_the_guards_state_round_trips_with_a_fresh_streak_and_reads_older_checkpoints() -> None:
    state = {"skipped": 4, "consecutive": 3, "spikes": 2, "norm_average": [0.5, 2.0], "norm_count": [7, 9]}
    guard = NonFiniteGuard()
    guard.load_state_dict(state)
    assert guard.state_dict() == {**state, "consecutive": 0}
    old = NonFiniteGuard()
    old.load_state_dict({"skipped": 1, "consecutive": 0})  # written before the spike check existed
    assert old.spikes == 0 and old.norm_average == [] and old.norm_count == []
    with pytest.raises(ValueError, match="spike_factor must be above 1"):
        NonFiniteGuard(spike_factor=0.5)


class TwoOptimizers(pl.LightningModule):
    """The autoencoder's shape: manual optimization, two AdamWs built by ``build_adamw``, the first one scheduled
    by ``warmup_cosine``, the second one stepped as the discriminator is (not counted as a global step); the
    second one's loss is NaN at the steps in ``bad_second``."""

    def __init__(self, lr: float, bad_second: set[int] = frozenset()) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first, self.second = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        self.lr, self.bad_second = lr, bad_second

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_first, opt_second = self.optimizers()
        nan = float("nan") if self.global_step in self.bad_second else 1.0
        opt_first.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self.first(x), y))
        opt_first.step()  # counts the global step
        self.lr_schedulers().step()
        opt_second.zero_grad()
        self.manual_backward(torch.nn.functional.mse_loss(self.second(x), y) * nan)
        self.trainer.strategy.optimizer_step(opt_second.optimizer, closure=lambda: None)  # as the discriminator's

    def configure_optimizers(self):
        kwargs = {"lr": self.lr, "betas": (0.5, 0.9), "weight_decay": 0.0}
        optimizers = [build_adamw(module.parameters(), {}, **kwargs) for module in (self.first, self.second)]
        return optimizers, [torch.optim.lr_scheduler.LambdaLR(optimizers[0], warmup_cosine(4, 20, 0.0))]


def test_a_training_step_is_one_bad_step_whichever_of_its_optimizers_is_non_finite(tmp_path: Path) -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive steps \(from step 4\)"):
        fit(TwoOptimizers(lr=0.1, bad_second=set(range(4, 20))), tmp_path, guard, steps=20, callbacks=[])
    assert guard.skipped == 3


# -- the learning rate of the config wins on resume ----------------------------------------------------------------

SCHEDULE = {"warmup_steps": 4, "total_steps": 20, "min_lr_ratio": 0.0}


def train_then_resume(tmp_path: Path, first: pl.LightningModule, resumed: pl.LightningModule, callbacks: list):
    """6 steps of ``first`` with a checkpoint at the end, then ``resumed`` from it to step 10."""
    fit(first, tmp_path / "first", NonFiniteGuard(), steps=6, callbacks=[checkpointer(tmp_path, every_n_train_steps=6)])
    path = tmp_path / "checkpoints" / "step006.ckpt"
    fit(resumed, tmp_path / "resumed", NonFiniteGuard(), steps=10, callbacks=callbacks, ckpt_path=path)
    return torch.load(path, weights_only=True)


def test_lightning_alone_resumes_with_the_checkpoints_lr(tmp_path: Path) -> None:
    """Why ConfiguredLearningRate exists: a lower lr given on resume is overwritten by the checkpoint's."""
    record = Record()
    resumed = Regression(bad_steps=set(), lr=0.01, schedule=SCHEDULE)
    train_then_resume(tmp_path, Regression(bad_steps=set(), schedule=SCHEDULE), resumed, [record])
    assert record.at_start["groups"][0][0]["initial_lr"] == 0.1 and record.at_start["base_lrs"] == [[0.1]]


def test_a_resumed_run_takes_the_configured_lr_and_keeps_the_schedules_position(tmp_path: Path, caplog) -> None:
    record = Record()
    resumed = Regression(bad_steps=set(), lr=0.01, schedule=SCHEDULE)
    with caplog.at_level(logging.INFO, logger="trainer.callbacks.learning_rate"):
        train_then_resume(
            tmp_path, Regression(bad_steps=set(), schedule=SCHEDULE), resumed, [ConfiguredLearningRate(), record]
        )
    factor = warmup_cosine(**SCHEDULE)
    group = record.at_start["groups"][0][0]
    assert group["initial_lr"] == 0.01 and record.at_start["base_lrs"] == [[0.01]]
    assert math.isclose(group["lr"], 0.01 * factor(6), rel_tol=1e-12)  # step 6 of the schedule, at the new peak
    assert all(math.isclose(lr, 0.01 * factor(step), rel_tol=1e-12) for step, lr in resumed.lrs_seen.items())
    assert sorted(resumed.lrs_seen) == [6, 7, 8, 9]
    assert "resuming with lr 0.01 instead of the checkpoint's 0.1" in caplog.text


def test_an_unchanged_lr_leaves_the_restored_optimizer_and_schedule_as_they_were(tmp_path: Path, caplog) -> None:
    record = Record()
    with caplog.at_level(logging.INFO, logger="trainer.callbacks.learning_rate"):
        saved = train_then_resume(
            tmp_path,
            Regression(bad_steps=set(), schedule=SCHEDULE),
            Regression(bad_steps=set(), schedule=SCHEDULE),
            [ConfiguredLearningRate(), record],
        )
    assert record.at_start["groups"][0] == [
        {k: v for k, v in g.items() if k != "params"} for g in saved["optimizer_states"][0]["param_groups"]
    ]
    assert record.at_start["base_lrs"] == [saved["lr_schedulers"][0]["base_lrs"]]
    assert "resuming with lr" not in caplog.text


def test_the_configured_lr_reaches_both_optimizers_of_a_manually_optimized_task(tmp_path: Path) -> None:
    record = Record()
    train_then_resume(tmp_path, TwoOptimizers(lr=0.1), TwoOptimizers(lr=0.02), [ConfiguredLearningRate(), record])
    scheduled, constant = record.at_start["groups"]
    assert scheduled[0]["initial_lr"] == 0.02 and record.at_start["base_lrs"] == [[0.02]]
    assert math.isclose(scheduled[0]["lr"], 0.02 * warmup_cosine(4, 20, 0.0)(6), rel_tol=1e-12)
    assert constant[0]["lr"] == 0.02 and "initial_lr" not in constant[0]


@pytest.mark.slow
def test_the_cli_resumes_with_a_lower_lr_given_on_the_command_line(tmp_path: Path) -> None:
    """The README's recipe end to end: a run stops, ``task.optimizer.lr`` is lowered, resume=auto picks the
    run folder's checkpoint up and trains on with the new lr (the callbacks as configs/callbacks/default.yaml
    has them)."""
    shards = tmp_path / "shards"
    write_shards(shards, "train", 40, 5)
    write_shards(shards, "val", 8, 4, seed=1)
    run_dir = tmp_path / "run"

    def train(*overrides: str) -> subprocess.CompletedProcess:  # shapes_clip: lr 1e-3, warmup 50 steps
        return training_cli(
            run_dir,
            shards,
            "shapes_clip",
            "task.export=false",
            "callbacks.checkpoint.every_n_train_steps=3",
            *overrides,
        )

    first = train("trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = train("trainer.max_steps=4", "task.optimizer.lr=2.5e-4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming with lr 0.00025 instead of the checkpoint's 0.001" in resumed.stdout + resumed.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert [g["initial_lr"] for g in last["optimizer_states"][0]["param_groups"]] == [2.5e-4, 2.5e-4]
    assert last["lr_schedulers"][0]["base_lrs"] == [2.5e-4, 2.5e-4]
    assert math.isclose(last["lr_schedulers"][0]["_last_lr"][0], 2.5e-4 * 5 / 50, rel_tol=1e-9)  # step 4 of 50


def test_throughput_logs_samples_per_second_and_data_wait(tmp_path: Path) -> None:
    model = Regression(bad_steps=set())
    trainer = pl.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path, name="", version=""),
        callbacks=[Throughput(log_every_n_steps=2)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, train_dataloaders=data())
    metrics = trainer.callback_metrics
    assert metrics["perf/samples_per_sec"] > 0
    assert metrics["perf/samples_per_sec"] == metrics["perf/samples_per_sec_per_device"]  # one device
    assert 0 <= metrics["perf/data_wait_fraction"] < 1
    assert metrics["perf/peak_memory_gb"] > 0.01


def test_batch_size_of_our_batches() -> None:
    assert batch_size_of({"image": torch.zeros(5, 3, 8, 8), "caption": ["a"] * 5}) == 5
    assert batch_size_of({"latents": torch.zeros(3, 4, 2, 2)}) == 3
    assert batch_size_of([torch.zeros(7, 2), torch.zeros(7)]) == 7


def test_the_progress_bar_counts_steps_to_max_steps_across_epochs(tmp_path: Path) -> None:
    from trainer.callbacks.progress import StepProgressBar

    bar = StepProgressBar(refresh_rate=1)
    trainer = pl.Trainer(
        max_steps=12,  # 8 batches an epoch: the run spans two epochs
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[bar],
    )
    totals = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            totals.append((bar.train_progress_bar.total, bar.train_progress_bar.n))

    trainer.callbacks.append(Watch())
    trainer.fit(Regression(bad_steps=set()), train_dataloaders=data())
    assert totals[0] == (12, 1) and totals[-1] == (12, 12)
    assert [n for _, n in totals] == list(range(1, 13))  # no restart at the second epoch
