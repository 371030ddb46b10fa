"""Exact resume of the data stream, atomic checkpoints and resume=auto, in-process."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import training_cli, write_shards
from tiny import AE, CLIP
from trainer.callbacks.resume import rng_state, set_rng_state
from trainer.checkpoints import atomic_torch_save, checkpoint_is_complete, export_vae, find_resume_checkpoint
from trainer.data.pipeline import ShardDataset, ShardLoader
from trainer.data.transforms import ImageTransform
from trainer.models.autoencoder import AutoencoderKL
from trainer.models.clip import build_clip, export_clip


def loader(shards: Path, num_workers: int, mode: str = "exact") -> ShardLoader:
    dataset = ShardDataset(
        str(shards / "train.manifest.json"),
        batch_size=4,
        mode=mode,
        epoch_length=64 if mode == "resampled" else None,
        transform=ImageTransform(size=24, crop="random", flip=True),
        shuffle_buffer=8,
        seed=3,
        num_workers=num_workers,
    )
    return ShardLoader(dataset, num_workers=num_workers)


def take(data: ShardLoader, epochs: int, stop_after: int | None = None) -> list[dict]:
    """Batches over ``epochs`` epochs, each reported consumed as training would; stops after ``stop_after``."""
    batches = []
    for _ in range(epochs):
        for batch in data:
            data.mark_consumed(batch)
            batches.append(batch)
            if stop_after is not None and len(batches) == stop_after:
                return batches
    return batches


@pytest.mark.parametrize(
    ("num_workers", "mode", "stop_after"),
    [(0, "exact", 3), (2, "exact", 5), (2, "exact", 12), (2, "resampled", 7), (3, "exact", 4)],
)
def test_a_resumed_loader_continues_the_interrupted_stream_exactly(
    tmp_path: Path, num_workers: int, mode: str, stop_after: int
) -> None:
    write_shards(tmp_path, "train", 44, 5)  # 9 shards, the last one short: 11 batches an epoch
    uninterrupted = take(loader(tmp_path, num_workers, mode), epochs=2)
    first = loader(tmp_path, num_workers, mode)
    head = take(first, epochs=2, stop_after=stop_after)
    state = first.state_dict()
    torch.save(state, tmp_path / "state.pt")  # the state survives a checkpoint file
    second = loader(tmp_path, num_workers, mode)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    epochs_left = 2 - state["epoch"]
    tail = take(second, epochs=epochs_left)
    resumed = head + tail
    assert [b["key"] for b in resumed] == [b["key"] for b in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert torch.equal(a["image"], b["image"])  # the same random crops and flips


def test_different_worker_count_restarts_the_epoch_with_a_warning(tmp_path: Path, caplog) -> None:
    write_shards(tmp_path, "train", 40, 5)
    first = loader(tmp_path, 2)
    take(first, epochs=1, stop_after=3)
    second = loader(tmp_path, 1)
    second.load_state_dict(first.state_dict())
    assert "cannot be restored exactly" in caplog.text and "num_workers 2 -> 1" in caplog.text
    keys = [k for b in second for k in b["key"]]
    assert sorted(keys) == sorted(f"train{i:06d}" for i in range(40))  # epoch 0 again, whole


def test_rng_state_round_trip() -> None:
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((4,), float(step))}, "global_step": step}


def test_atomic_save_leaves_no_partial_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save(checkpoint(1), path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({**checkpoint(2), "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_find_resume_checkpoint_skips_corrupt_and_truncated_files(tmp_path: Path, caplog) -> None:
    assert find_resume_checkpoint(tmp_path / "missing") is None
    for step in (1, 2, 3):
        atomic_torch_save(checkpoint(step), tmp_path / f"step{step}.ckpt")
        os.utime(tmp_path / f"step{step}.ckpt", (step, step))
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step3.ckpt"
    data = (tmp_path / "step3.ckpt").read_bytes()
    (tmp_path / "step3.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    (tmp_path / "step4.ckpt").write_bytes(b"garbage" * 100)  # newest, not a checkpoint
    assert not checkpoint_is_complete(tmp_path / "step3.ckpt")[0]
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step2.ckpt"
    assert "step4.ckpt" in caplog.text and "step3.ckpt" in caplog.text


# -- the training CLI: kill -9, resume, compare bitwise with an uninterrupted run -------------------------------------


def run_cli(
    run_dir: Path, shards: Path, experiment: str, *overrides: str, expect_kill: bool = False
) -> subprocess.CompletedProcess:
    result = training_cli(run_dir, shards, experiment, "data.crop=random", "data.resize_size=40", *overrides)
    if expect_kill:
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def final_state(run_dir: Path) -> dict:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 8
    return checkpoint


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert len(a["optimizer_states"]) == len(b["optimizer_states"])
    for optimizer_a, optimizer_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert optimizer_a["state"].keys() == optimizer_b["state"].keys()
        for state_a, state_b in zip(optimizer_a["state"].values(), optimizer_b["state"].values(), strict=True):
            for key, value in state_a.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[key])), key
    assert a["lr_schedulers"] == b["lr_schedulers"]


def ldm_stages(folder: Path) -> list[str]:
    """Stand-ins for the CLIP and autoencoder stages of ``shapes_ldm`` (random tiny models), and the overrides
    that train it on them with every random draw it has: posterior samples, and half the captions dropped."""
    torch.manual_seed(0)
    clip, _ = build_clip("resume-test-clip", CLIP)
    export_clip(clip, "resume-test-clip", CLIP, folder / "clip")
    export_vae(AutoencoderKL.from_config(AE), folder / "vae.safetensors", scale_factor=0.5, config=AE)
    return [
        f"task.text_encoder.source={folder / 'clip'}",
        f"task.autoencoder.checkpoint={folder / 'vae.safetensors'}",
        "task.autoencoder.posterior=sample",
        "task.caption_dropout=0.5",
        f"model.context_dim={CLIP['text_cfg']['width']}",
        "task.validation.steps=2",
        "task.export=false",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("experiment", "ddp"),
    [
        ("shapes_clip", False),
        pytest.param("shapes_clip", True, marks=pytest.mark.distributed),
        # posterior samples draw from torch's RNG, and its two optimizers step by hand (manual optimization)
        ("shapes_autoencoder", False),
        # each rank draws its own posterior samples (reseeded from its rank), and resumes its own RNG state
        pytest.param("shapes_autoencoder", True, marks=pytest.mark.distributed),
        # noise, timesteps, caption dropout and posterior samples, and the EMA copy
        ("shapes_ldm", False),
    ],
)
def test_kill_9_and_resume_is_bitwise_identical_to_an_uninterrupted_run(
    tmp_path: Path, experiment: str, ddp: bool
) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, "train", 60, 5)  # 12 shards: 15 batches of 4 an epoch in one process, 7 per rank in two
    write_shards(shards, "val", 8, 4, seed=1)
    extra = ["trainer.devices=2", "trainer.strategy=ddp", "data.num_workers=1"] if ddp else ["data.num_workers=2"]
    if experiment == "shapes_ldm":
        extra += ldm_stages(tmp_path / "stages")
    else:
        extra.append("task.export=false" if experiment == "shapes_clip" else "task.scale_factor_samples=8")
    if experiment == "shapes_autoencoder":
        extra += ["task.disc_start=3"]  # the discriminator's optimizer joins mid-run
    run_cli(tmp_path / "straight", shards, experiment, *extra)
    interrupted = tmp_path / "interrupted"
    run_cli(
        interrupted,
        shards,
        experiment,
        *extra,
        "+callbacks.kill._target_=faults.KillAtStep",
        "+callbacks.kill.step=4",
        expect_kill=True,
    )
    assert (interrupted / "checkpoints" / "step00000004.ckpt").is_file()
    assert not (interrupted / "checkpoints" / "step00000008.ckpt").exists()
    resumed = run_cli(interrupted, shards, experiment, *extra)  # same folder: resume=auto finds step 4
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert_bitwise_equal(final_state(tmp_path / "straight"), final_state(interrupted))


@pytest.mark.slow
def test_sigusr1_saves_stops_and_the_next_run_continues_from_there(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, "train", 60, 5)
    write_shards(shards, "val", 8, 4, seed=1)
    extra = ["data.num_workers=2", "task.export=false"]
    run_cli(tmp_path / "straight", shards, "shapes_clip", *extra)
    preempted = tmp_path / "preempted"
    first = run_cli(
        preempted,
        shards,
        "shapes_clip",
        *extra,
        "+callbacks.signal._target_=faults.SignalAtStep",
        "+callbacks.signal.step=4",
    )
    assert "SIGUSR1 received" in first.stdout + first.stderr
    assert (preempted / "checkpoints" / "preempt-step00000005.ckpt").is_file()
    assert (tmp_path / "latest").resolve().name == "straight"  # a preempted run is not a finished one
    second = run_cli(preempted, shards, "shapes_clip", *extra)
    assert "resuming from" in second.stdout + second.stderr
    assert "preempt-step00000005.ckpt" in second.stdout + second.stderr
    assert_bitwise_equal(final_state(tmp_path / "straight"), final_state(preempted))


@pytest.mark.slow
def test_wandb_offline_writes_a_run_and_a_resumed_run_logs_into_the_same_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    shards = tmp_path / "shards"
    write_shards(shards, "train", 60, 5)
    write_shards(shards, "val", 8, 4, seed=1)
    run = tmp_path / "run"
    common = ["logger=[csv,wandb]", "data.num_workers=0", "task.export=false"]
    kill = ["+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=4"]
    run_cli(run, shards, "shapes_clip", *common, *kill, expect_kill=True)
    run_cli(run, shards, "shapes_clip", *common)
    run_id = (run / "wandb_id").read_text().strip()
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one wandb run, resumed
    logged = (runs[-1] / f"run-{run_id}.wandb").read_bytes()
    for metric in (b"train/loss", b"perf/samples_per_sec", b"perf/data_wait_fraction", b"train/skipped_steps"):
        assert metric in logged, metric
