"""Fault injection for integration tests, importable by the training CLI in a subprocess when the tests
folder is on PYTHONPATH: ``+callbacks.kill._target_=faults.KillAtStep +callbacks.kill.step=4``."""

from __future__ import annotations

import hashlib
import json
import os
import signal

import pytorch_lightning as pl
import torch


class KillAtStep(pl.Callback):
    """SIGKILL this process (every rank does the same) as the batch after optimizer step ``step`` begins,
    i.e. after the checkpoint of step ``step`` is on disk and before anything of the next step is."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank  # rank: only that rank dies (None: every rank)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(pl.Callback):
    """Send ``signum`` to this process at the start of the batch after optimizer step ``step`` (rank 0 only)."""

    def __init__(self, step: int, signum: str = "SIGUSR1") -> None:
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


class RecordRanks(pl.Callback):
    """Write, per rank, a fingerprint of torch's RNG state as the first training batch begins and of the
    weights as training ends, to ``folder/rank<r>.json`` (draws nothing itself)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.record: dict[str, str] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if "rng" not in self.record:
            self.record["rng"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().float().numpy().tobytes())
        self.record["weights"] = digest.hexdigest()
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(self.record, f)
