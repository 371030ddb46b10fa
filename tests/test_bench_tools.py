"""The GPU check's benchmark runs anywhere on tiny models, so that it still works when a GPU is next lent."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_cuda_paths_runs_every_mode_on_tiny_models_on_the_cpu() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench" / "cuda_paths.py"), "--tiny", "--device", "cpu"]
        + ["--models", "vae", "clip", "--modes", "fp32", "bf16", "bf16+cl", "--iters", "1", "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| (vae|clip) \| (\S+) \|(.*)\|$", result.stdout, flags=re.M)
    # channels_last applies to the convolutional VAE only
    assert [(model, mode) for model, mode, _ in rows] == [
        ("vae", "fp32"),
        ("vae", "bf16"),
        ("vae", "bf16+cl"),
        ("clip", "fp32"),
        ("clip", "bf16"),
    ]
    for _, mode, cells in rows:
        step_ms, _, _, _, error, nonfinite, _ = (c.strip() for c in cells.split("|"))
        assert float(step_ms) > 0 and nonfinite == "0"
        assert float(error) < (1e-6 if mode == "fp32" else 5e-2)  # bf16 rounding, from the same weights and inputs
    assert "GFLOP forward+backward per sample" in result.stdout
