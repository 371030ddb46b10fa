"""Integration: the real entry point trains a few steps, in one process and in 2-process DDP on CPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_shards

TESTS = str(Path(__file__).resolve().parent)


def train(tmp_path: Path, shards: Path, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.train",
            "experiment=shapes_clip",
            "debug=fast",
            "data.prepare=null",
            "data.image_size=32",
            f"data.train.urls={shards}/train.manifest.json",
            f"data.val.urls={shards}/val.manifest.json",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])},  # faults.py
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    with open(next(run_dir.rglob("metrics.csv"))) as f:
        return list(csv.DictReader(f))


def test_a_short_run_trains_logs_validates_and_checkpoints(tmp_path: Path, shards: Path) -> None:
    run_dir = train(tmp_path, shards, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3")
    assert (run_dir / "config.yaml").is_file()
    assert "max_steps: 3" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    rows = metrics(run_dir)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert any(r.get("val/image_to_text_R@1") for r in rows)
    assert any(r.get("data/skipped_broken_image") == "0.0" for r in rows)


def test_task_compile_from_the_command_line_trains(tmp_path: Path, shards: Path) -> None:
    """task.compile takes torch.compile's keywords as a Hydra dict; aot_eager traces the CLIP model's forward and
    backward as inductor would, without needing a C++ compiler."""
    run_dir = train(tmp_path, shards, "trainer.max_steps=2", "task.compile={backend:aot_eager,dynamic:false}")
    assert "backend: aot_eager" in (run_dir / "config.yaml").read_text()
    losses = [float(r["train/loss"]) for r in metrics(run_dir) if r.get("train/loss")]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, "train", 48, 6)
    write_shards(shards, "val", 16, 4, seed=1)
    run_dir = train(
        tmp_path,
        shards,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.num_workers=1",
        "trainer.max_steps=2",
        "+callbacks.ranks._target_=faults.RecordRanks",
        f"+callbacks.ranks.folder={tmp_path / 'ranks'}",
    )
    rows = metrics(run_dir)
    assert [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    # validation gathered both ranks' features: 16 val samples in all
    assert any(r.get("val/samples") == "16.0" for r in rows)
    # the ranks hold the same weights, and draw their own random numbers (noise, timesteps, dropout)
    rank0, rank1 = (json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["weights"] == rank1["weights"]
    assert rank0["rng"] != rank1["rng"]


@pytest.mark.distributed
@pytest.mark.slow
def test_the_three_shapes_stages_chain_through_the_cli(tmp_path: Path) -> None:
    """shapes_clip -> shapes_autoencoder -> shapes_ldm with debug=fast: the LDM finds the earlier
    stages' exports through outputs/<name>/latest, as the experiment configs name them. The two stages
    with an EMA train in 2-process DDP (an EMA copy that asked for gradients stopped DDP)."""
    common = [
        "debug=fast",
        f"paths.root_dir={tmp_path}",
        "data.prepare.n_train=400",
        "data.prepare.n_val=64",
        "data.prepare.samples_per_shard=32",  # two val shards: one per DDP rank
    ]
    for experiment in ("shapes_clip", "shapes_autoencoder", "shapes_ldm"):
        ddp = [] if experiment == "shapes_clip" else ["trainer.devices=2", "trainer.strategy=ddp", "data.num_workers=1"]
        result = subprocess.run(
            [sys.executable, "-m", "trainer.train", f"experiment={experiment}", *common, *ddp],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{experiment}: {result.stderr[-3000:]}"
        assert (tmp_path / "outputs" / experiment / "latest" / "config.yaml").is_file()
    exports = tmp_path / "outputs"
    assert (exports / "shapes_clip" / "latest" / "export" / "clip" / "open_clip_config.json").is_file()
    assert (exports / "shapes_autoencoder" / "latest" / "export" / "autoencoder.safetensors").is_file()
    assert (exports / "shapes_ldm" / "latest" / "export" / "ldm.safetensors").is_file()
    assert list((exports / "shapes_ldm" / "latest" / "images").glob("samples_*.png"))


@pytest.mark.parametrize(
    ("strategy", "devices", "expected"),
    [("ddp", 1, True), ("auto", 2, True), ("ddp_find_unused_parameters_false", 1, False), ("auto", 1, None)],
)
def test_the_autoencoder_turns_on_ddp_unused_parameter_detection(strategy, devices, expected) -> None:
    """However DDP was chosen (a plain string, or auto with several devices as under SLURM and torchrun); an
    explicit choice is kept, and a single-device run has no DDP to change."""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    from trainer.tasks.autoencoder import AutoencoderTask

    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False)
    task = AutoencoderTask.__new__(AutoencoderTask)  # setup reads only the trainer
    pl.LightningModule.__init__(task)
    task.trainer = trainer
    task.setup("fit")
    if expected is None:
        assert not isinstance(trainer.strategy, DDPStrategy)
    else:
        assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is expected
