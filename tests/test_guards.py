"""The non-finite guard, throughput metrics and the progress bar, in-process with a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from trainer.callbacks.nan_guard import NonFiniteGuard
from trainer.callbacks.throughput import Throughput, batch_size_of
from trainer.errors import NonFiniteTrainingError


class Regression(pl.LightningModule):
    """Linear regression whose loss is NaN at the global steps in ``bad_steps``."""

    def __init__(self, bad_steps: set[int]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_steps = bad_steps
        self.weights_seen: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        self.weights_seen[self.global_step] = self.layer.weight.detach().clone()
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if self.global_step in self.bad_steps:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=8)


def fit(model: Regression, tmp_path: Path, guard: NonFiniteGuard, steps: int = 8) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path, name="", version=""),
        callbacks=[guard, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2)],
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, train_dataloaders=data())
    return trainer


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


def test_too_many_consecutive_bad_steps_stop_with_the_last_good_checkpoint_intact(tmp_path: Path) -> None:
    model = Regression(bad_steps=set(range(5, 100)))
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps"):
        fit(model, tmp_path, NonFiniteGuard(max_consecutive=3), steps=20)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "the checkpoints before the bad steps are kept"
    newest = torch.load(checkpoints[-1], weights_only=True)
    assert newest["global_step"] <= 7  # steps 5, 6, 7 were the bad ones: none of them was completed
    assert all(torch.isfinite(v).all() for v in newest["state_dict"].values())


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
