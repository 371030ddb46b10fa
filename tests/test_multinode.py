"""Two nodes on loopback through torchrun (``--nnodes=2 --nproc_per_node=1``): DDP across them gives the
single-process result on the same global batch."""

from __future__ import annotations

import csv
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def overrides(shards: Path, run_dir: Path, batch_size: int) -> list[str]:
    return [
        "experiment=shapes_clip",
        "model=clip/tiny",  # a ViT: the ResNet tower's BatchNorm statistics per rank would differ from one process's
        "debug=fast",
        "data.prepare=null",
        "data.image_size=32",
        f"data.batch_size={batch_size}",
        "data.shuffle_buffer=1",  # shard order still shuffled (the same permutation on every rank)
        "data.num_workers=0",
        f"data.train.urls={shards}/train.manifest.json",
        f"data.val.urls={shards}/val.manifest.json",
        f"hydra.run.dir={run_dir}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=100",
        "trainer.limit_val_batches=0",
        "task.export=false",
        "task.local_loss=false",  # every rank computes the loss of the whole global batch: comparable values
    ]


def one_process(shards: Path, run_dir: Path) -> Path:
    """The reference: one process, batch 8 = both ranks' batches of 4."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", *overrides(shards, run_dir, 8)],
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def losses(run_dir: Path) -> list[float]:
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_torchrun_two_nodes_matches_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, "train", 48, 4)  # a shard is one per-rank batch: rank r reads shards r::2
    write_shards(shards, "val", 8, 4, seed=1)
    one_process(shards, tmp_path / "single")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={rank}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "trainer.train",
                *overrides(shards, tmp_path / "two_nodes", 4),
                "trainer.num_nodes=2",
                "trainer.devices=1",
                "trainer.strategy=ddp",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "MEMBER: 1/2" in "".join(outputs) and "MEMBER: 2/2" in "".join(outputs)
    one, two = losses(tmp_path / "single"), losses(tmp_path / "two_nodes")
    assert len(one) == len(two) == 3
    assert two[0] == pytest.approx(one[0], rel=1e-5)  # same weights, same 8 samples
    assert two == pytest.approx(one, rel=1e-3)  # and the same updates (up to reduction order)
