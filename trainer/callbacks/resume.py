"""Exact resume: the data position and every random number generator travel with the checkpoint.

Lightning restores weights, optimizer, LR schedule, grad scaler, loop counters and the training
loader's ``state_dict`` by itself; this callback supplies the two things it does not:

- the data position in *consumed* batches: it tells the :class:`~trainer.data.pipeline.ShardLoader`
  about every batch training takes, since Lightning and the loader workers prefetch ahead;
- the RNG states (Python, NumPy, torch CPU and CUDA) of every rank, gathered into the checkpoint that
  rank 0 writes and handed back to each rank before its first step after a resume.

Validation runs inside a saved-and-restored RNG state, so how often a run validates never changes
the random numbers training draws (noise, timesteps, caption dropout, posterior samples).

It also gives every rank of a multi-process run its own random numbers. ``seed_everything`` seeds every
rank alike, which the models need (they are built alike on every rank) but training does not want: each
rank would draw the same noise, timesteps and caption dropout as every other, so a global batch of N ranks
would hold only 1/N of the draws it looks like. When training starts (the models built and wrapped), rank r
reseeds Python's, NumPy's and torch's generators from ``(seed, r)`` (as open_clip's training reseeds with
its rank), so the draws differ between ranks and stay the same from run to run. One process is left as it is.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from trainer.data.pipeline import ShardLoader

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """The state of every generator a training step may draw from, on this process."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # tensors and plain numbers only, so that Lightning's weights_only checkpoint loading accepts them
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_gather(trainer: pl.Trainer, obj: Any) -> list[Any]:
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def seed_rank(seed: int, rank: int) -> int:
    """Seed Python's, NumPy's and torch's generators (CUDA's included) for rank ``rank`` of a run seeded with
    ``seed``: a seed of its own, from NumPy's SeedSequence of ``(seed, rank)``; returns it."""
    rank_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)
    return rank_seed


class ExactResume(pl.Callback):
    """See the module docstring. :func:`trainer.train.train` adds it to every run, with the run's ``seed``
    (None: the ranks are not reseeded)."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._pending: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the models are built and wrapped, before the first draw of training; a resumed run then
        # replaces these states by the checkpoint's (on_train_batch_start), so resume stays exact.
        if self.seed is not None and trainer.world_size > 1:
            rank_seed = seed_rank(self.seed, trainer.global_rank)
            log.info("rank %d draws its own random numbers: reseeded with %d", trainer.global_rank, rank_seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self._pending is not None:  # as late as possible: nothing between here and the step draws numbers
            set_rng_state(self._pending)
            self._pending = None
        loader = trainer.train_dataloader
        if isinstance(loader, ShardLoader):
            loader.mark_consumed(batch)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Every rank gets here (Lightning builds the checkpoint on all ranks, rank 0 writes it).
        state = self._outside_validation or rng_state()
        checkpoint["rng_states"] = _all_gather(trainer, state)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            log.warning("the checkpoint has no RNG states (written by an older version): random draws will differ")
            return
        if len(states) != trainer.world_size:
            log.warning(
                "the checkpoint holds RNG states of %d ranks, this run has %d: random draws will differ from an "
                "uninterrupted run",
                len(states),
                trainer.world_size,
            )
            return
        self._pending = states[trainer.global_rank]

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":  # validation inside a fit, not trainer.validate()
            self._outside_validation = rng_state()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._outside_validation is not None:
            set_rng_state(self._outside_validation)
            self._outside_validation = None
