"""Every rank of a multi-process run draws its own random numbers once training starts (trainer/callbacks/resume.py)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch

from trainer.callbacks.resume import ExactResume, rng_state, seed_rank


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_each_rank_gets_its_own_stream_and_the_same_one_every_run() -> None:
    seed_rank(0, 0)
    rank0 = draws()
    seed_rank(0, 1)
    rank1 = draws()
    seed_rank(0, 0)
    assert draws() == rank0
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))
    seed_rank(1, 0)
    assert all(a != b for a, b in zip(draws(), rank0, strict=True))  # another run seed, another stream


def test_the_ranks_are_reseeded_when_training_starts_and_a_single_process_is_left_alone() -> None:
    def after_fit_start(seed: int | None, world_size: int, rank: int) -> tuple[float, float, float]:
        torch.manual_seed(123)
        random.seed(123)
        np.random.seed(123)
        ExactResume(seed).on_fit_start(SimpleNamespace(world_size=world_size, global_rank=rank), None)
        return draws()

    untouched = after_fit_start(None, 1, 0)
    assert after_fit_start(7, 1, 0) == untouched  # one process: its draws are those of seed_everything
    assert after_fit_start(None, 2, 1) == untouched  # no seed given: nothing to derive the ranks' seeds from
    rank0, rank1 = after_fit_start(7, 2, 0), after_fit_start(7, 2, 1)
    assert rank0 != untouched and rank1 != untouched and rank0 != rank1
    assert after_fit_start(7, 2, 1) == rank1


def test_a_resumed_rank_continues_from_its_checkpointed_state_not_from_its_reseed() -> None:
    callback = ExactResume(7)
    seed_rank(7, 1)
    draws()
    saved = rng_state()  # what a checkpoint of rank 1 holds, mid-run
    expected = draws()
    trainer = SimpleNamespace(world_size=2, global_rank=1)
    callback.on_load_checkpoint(trainer, None, {"rng_states": [None, saved]})
    callback.on_fit_start(trainer, None)
    callback.on_train_batch_start(SimpleNamespace(train_dataloader=None), None, None, 0)
    assert draws() == expected
