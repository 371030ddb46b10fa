"""Shared fixtures: tiny shard sets written into tmp_path (tests make their own data)."""

from __future__ import annotations

import os
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
