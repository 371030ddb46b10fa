"""Shared fixtures: tiny shard sets written into tmp_path (tests make their own data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.shards import ShardWriter

REPO = Path(__file__).resolve().parent.parent

# Lightning's tips and deprecation chatter would drown the test output.
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def write_shards(out_dir: Path, prefix: str, n: int, per_shard: int, size: int = 48, seed: int = 0) -> dict:
    """``n`` random-colour images with captions naming their index; returns the manifest."""
    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, prefix, samples_per_shard=per_shard) as writer:
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            writer.write(f"{prefix}{i:06d}", Image.fromarray(pixels), f"sample number {i}", {"index": i})
    return writer.manifest


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """40 samples in 8 shards of 5 (prefix ``train``) and 12 in 2 shards (``val``)."""
    write_shards(tmp_path, "train", 40, 5)
    write_shards(tmp_path, "val", 12, 6, seed=1)
    return tmp_path


def training_cli(run_dir: Path, shards: Path, experiment: str, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m trainer.train experiment=...`` on the tiny ``shards`` (train and val manifests), in ``run_dir``:
    8 steps of batch 4 at 32 px, validation every 3 steps, a checkpoint every 4; tests/ on PYTHONPATH, so that
    ``+callbacks.x._target_=faults.KillAtStep`` and the like load."""
    tests = str(Path(__file__).resolve().parent)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.train",
            f"experiment={experiment}",
            "debug=fast",
            "data.prepare=null",
            "data.image_size=32",
            "data.batch_size=4",
            "data.shuffle_buffer=8",
            f"data.train.urls={shards}/train.manifest.json",
            f"data.val.urls={shards}/val.manifest.json",
            f"hydra.run.dir={run_dir}",
            "trainer.max_steps=8",
            "trainer.max_epochs=-1",
            "trainer.val_check_interval=3",
            "callbacks.checkpoint.every_n_train_steps=4",
            *overrides,
        ],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def spawn_ranks(target, folder: Path, world: int = 2, timeout: float = 120) -> dict:
    """Run ``target(rank, world, port, folder, queue)`` in ``world`` spawned processes that rendezvous on a free
    loopback port; returns what each put on the queue, as ``{rank: result}`` (``queue.put((rank, result))``)."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=target, args=(rank, world, port, str(folder), queue)) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=timeout)
    return dict(queue.get(timeout=5) for _ in processes)
