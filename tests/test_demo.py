"""The end-to-end demo, ``python -m trainer.demo --fast``: all three stages as Hydra runs, sampling of
held-out prompts, the shapes evaluation and the summary, with every file the README promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from trainer.data import shapes
from trainer.demo import demo_device, main, native_bf16, stage_precision


@pytest.mark.slow
def test_the_fast_demo_runs_end_to_end_and_writes_what_it_promises(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = subprocess.run(
        # --device cpu: the precisions checked below are the CPU's, also where a GPU is present
        [sys.executable, "-m", "trainer.demo", "--fast", "--out", str(out), "--ldm-steps", "30", "--device", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for stage in ("shapes_clip", "shapes_autoencoder", "shapes_ldm"):  # progress shown as it goes
        assert f"=== {stage}" in result.stdout
    # CLIP and the autoencoder run at the same time: their output is told apart by a prefix
    assert "[clip] " in result.stdout and "[autoencoder] " in result.stdout
    assert "| total |" in result.stdout  # the summary table

    samples = out / "samples"
    lines = [json.loads(line) for line in (samples / "prompts.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    for line in lines:
        assert (samples / line["file"]).is_file() and line["file"].endswith(".png")
        assert set(line["attributes"]) == {"color", "shape", "position", "size"}
        assert shapes.parse_caption(line["prompt"]) == line["attributes"]
        assert isinstance(line["seed"], int)
    assert len({line["seed"] for line in lines}) == 8
    grid, strip = Image.open(samples / "grid.png"), Image.open(samples / "trajectory.png")
    assert grid.width > 64 and grid.height > 64  # labelled: taller/wider than the bare images
    assert strip.width >= 4 * strip.height  # one image at several steps, side by side

    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) >= {"color", "shape", "position", "size"}
    assert all(0 <= value <= 1 for value in report["accuracy"].values())
    summary = json.loads((out / "summary.json").read_text())
    times = summary["times_s"]
    assert set(times) == {"data", "clip", "autoencoder", "latents", "ldm", "sample+eval"}
    # each of the two concurrent stages reports its own time, and they overlapped: the total is less than the sum
    assert times["clip"] > 0 and times["autoencoder"] > 0
    assert summary["total_s"] < sum(times.values())
    # the evaluator on the autoencoder's reconstructions of the same prompts: a reference for the samples
    assert set(summary["reconstructions"]) >= {"color", "shape", "position", "size"}
    assert all(0 <= value <= 1 for value in summary["reconstructions"].values())
    assert "its reconstructions read color" in result.stdout
    assert sorted(p.name for p in (out / "latents").glob("train-*.tar"))  # the LDM trained on cached latents
    for run in ("clip", "autoencoder", "ldm"):
        assert (out / run / "checkpoints" / "last.ckpt").is_file()
    # CLIP and the autoencoder in bf16 where the CPU has it natively, else float32; the LDM in float32
    assert summary["precision"] == ("bf16-mixed" if native_bf16() else "32-true") and summary["device"] == "cpu"
    for run, precision in (("clip", summary["precision"]), ("autoencoder", summary["precision"]), ("ldm", "32-true")):
        config = yaml.safe_load((out / run / ".hydra" / "config.yaml").read_text())
        assert str(config["trainer"].get("precision", "32-true")) == precision
    # --ldm-steps replaces the schedule's 60 UNet steps, and the LDM run trained that long
    assert summary["steps"] == {"clip": 40, "autoencoder": 200, "ldm": 30}
    ldm_config = yaml.safe_load((out / "ldm" / ".hydra" / "config.yaml").read_text())
    assert ldm_config["trainer"]["max_steps"] == 30
    assert summary["ldm"]["step"] == 30 - 1  # the last logged step (Lightning counts from 0)
    for run, steps in summary["steps"].items():  # what was sampled and evaluated is each stage's last step
        # the file this test's run just wrote; Lightning's checkpoints hold non-tensor state (loops, hparams)
        checkpoint = torch.load(out / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == steps, run
    assert summary["autoencoder"]["val/psnr"] > 12  # it trained (19 dB measured after the 200 fast steps)


def test_ldm_steps_below_one_are_refused_before_any_work(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--ldm-steps", "0", "--out", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    assert "--ldm-steps must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_fp16_is_refused_on_the_cpu_before_any_work(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--precision", "16-mixed", "--device", "cpu", "--out", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    assert "--precision 16-mixed is for GPUs" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("fpu avx2 amx_bf16 amx_tile", True),
        ("fpu avx2 avx512f", False),
    ],
)
def test_bf16_is_used_only_where_the_cpu_computes_it_natively(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert native_bf16(cpuinfo) is expected
    assert native_bf16(tmp_path / "missing") is False  # no /proc/cpuinfo (macOS, Windows): float32
    assert stage_precision("auto", cpuinfo) == ("bf16-mixed" if expected else "32-true")
    for choice in ("32-true", "bf16-mixed"):  # --precision overrides what the CPU offers
        assert stage_precision(choice, cpuinfo) == choice


def test_the_demo_trains_on_the_gpu_when_torch_sees_one(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo_device("auto") == "cpu" and demo_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="--device cuda, but torch sees no GPU"):
        demo_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo_device("auto") == "cuda" and demo_device("cpu") == "cpu"
    for bf16, expected in ((True, "bf16-mixed"), (False, "16-mixed")):  # fp16 with a loss scaler before Ampere
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert stage_precision("auto", device="cuda") == expected
        assert stage_precision("32-true", device="cuda") == "32-true"
