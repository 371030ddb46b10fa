"""Integration: the real entry point trains a few steps, in one process and in 2-process DDP on CPU."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_shards


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
    )
    rows = metrics(run_dir)
    assert [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    # validation gathered both ranks' features: 16 val samples in all
    assert any(r.get("val/samples") == "16.0" for r in rows)


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


def test_the_autoencoder_gets_ddp_unused_parameter_detection_and_clip_does_not() -> None:
    from trainer.tasks.autoencoder import AutoencoderTask
    from trainer.tasks.clip import CLIPTask
    from trainer.train import _unused_parameter_detection

    for task_class, expected in ((AutoencoderTask, True), (CLIPTask, False)):
        task = task_class.__new__(task_class)  # the class attribute is all that is read
        plain = {"strategy": "ddp"}
        configured = {"strategy": {"_target_": "pytorch_lightning.strategies.DDPStrategy", "static_graph": False}}
        single = {"strategy": "auto"}
        for cfg in (plain, configured, single):
            _unused_parameter_detection(task, cfg)
        assert plain["strategy"] == ("ddp_find_unused_parameters_true" if expected else "ddp")
        assert configured["strategy"].get("find_unused_parameters", False) is expected
        assert single["strategy"] == "auto"
