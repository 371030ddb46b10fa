"""Faults and hostile input at the entry points (issue 22): checkpoints that would run code, resumed logs, two runs
in one folder, resume by step, orphaned temporaries, and one-line messages for bad values, bad files, a full disk,
unquoted brace patterns and a dead DDP rank."""

from __future__ import annotations

import csv
import errno
import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, training_cli, write_shards
from trainer.checkpoint_io import AtomicCheckpointIO
from trainer.checkpoints import (
    atomic_torch_save,
    find_resume_checkpoint,
    read_weights,
    remove_orphaned_temporaries,
    torch_load,
)
from trainer.cli_errors import check_brace_overrides, user_message
from trainer.errors import CheckpointError, DiskFullError
from trainer.run_lock import RunFolderInUseError, RunLock


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "global_step": 1, "payload": Payload(marker)}, path)
    return path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_folder(tmp_path: Path):
    """A folder served over HTTP on loopback; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def cli(run_dir: Path, shards: Path, *overrides: str, experiment: str = "shapes_clip") -> subprocess.CompletedProcess:
    """A tiny run of the training CLI (``experiment``) on ``shards``, in ``run_dir``."""
    export = ["task.export=false"] if experiment == "shapes_clip" else []
    return training_cli(run_dir, shards, experiment, *export, *overrides)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit code 2 and a single ``error:`` line, no traceback; returns that line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    write_shards(folder, "train", 60, 5)
    write_shards(folder, "val", 8, 4, seed=1)
    return folder


# -- 1. no code from a checkpoint ---------------------------------------------------------------------------------


def test_a_checkpoint_that_would_run_code_is_refused_locally_and_over_http(
    tmp_path: Path, http_folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, base = http_folder
    marker = tmp_path / "pwned"
    malicious_checkpoint(folder / "evil.ckpt", marker)
    # the control: Lightning's own loader unpickles a URL with weights_only=False and runs the payload
    from lightning_fabric.utilities.cloud_io import _load

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    _load(f"{base}/evil.ckpt")
    assert marker.exists()
    marker.unlink()
    # ours: the same file, as a path, a URL, or through the checkpoint IO Lightning resumes with
    for source in (folder / "evil.ckpt", f"{base}/evil.ckpt"):
        with pytest.raises(CheckpointError, match=r"refused: it holds Python objects \((io|builtins)\.open\)"):
            torch_load(source)
        with pytest.raises(CheckpointError, match="refused"):
            AtomicCheckpointIO().load_checkpoint(source, weights_only=False)  # weights_only=False is not obeyed
    with pytest.raises(CheckpointError, match="refused") as raised:
        read_weights(folder / "evil.ckpt")
    assert "weights_only" not in str(raised.value)  # never the advice to unpickle it anyway
    assert not marker.exists()


@pytest.mark.slow
def test_the_training_cli_refuses_a_malicious_checkpoint_url_in_one_line(
    tmp_path: Path, shards: Path, http_folder
) -> None:
    folder, base = http_folder
    marker = tmp_path / "pwned"
    malicious_checkpoint(folder / "evil.ckpt", marker)
    line = one_line_error(cli(tmp_path / "run", shards, f"ckpt_path={base}/evil.ckpt"))
    assert "evil.ckpt was refused" in line
    assert not marker.exists()
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(4096))
    line = one_line_error(cli(tmp_path / "run2", shards, f"ckpt_path={tmp_path / 'noise.ckpt'}"))
    assert "noise.ckpt" in line and "cannot be read" in line


def test_tools_sample_says_one_line_for_random_bytes_and_for_a_malicious_checkpoint(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(4096))
    malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    for name, expected in (("noise.ckpt", "cannot be read"), ("evil.ckpt", "refused")):
        result = subprocess.run(
            [sys.executable, str(REPO / "tools" / "sample.py"), str(tmp_path / name), "--prompt", "a red circle"]
            + ["--out", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        line = one_line_error(result)
        assert name in line and expected in line
    assert not marker.exists()


def test_truncated_safetensors_name_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(64, 3, 3, 3)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"vae\.safetensors cannot be read as safetensors"):
        read_weights(path)


@pytest.mark.slow
def test_a_truncated_safetensors_as_pretrained_weights_stops_the_cli_in_one_line(tmp_path: Path, shards: Path) -> None:
    from trainer.checkpoints import export_vae
    from trainer.models.autoencoder import AutoencoderKL

    config = {
        "embed_dim": 4,
        "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 8,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "norm_num_groups": 4,
        },
    }  # fmt: skip
    path = export_vae(AutoencoderKL.from_config(config), tmp_path / "vae.safetensors", config=config)
    path.write_bytes(path.read_bytes()[:-64])
    result = cli(
        tmp_path / "run",
        shards,
        "model=autoencoder/tiny_f4",
        f"task.pretrained={path}",
        experiment="shapes_autoencoder",
    )
    line = one_line_error(result)
    assert "vae.safetensors cannot be read as safetensors" in line


# -- 2. a resumed run keeps its logged history ------------------------------------------------------------------


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "debug" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_a_resumed_run_keeps_the_metrics_logged_before_the_kill(tmp_path: Path, shards: Path) -> None:
    common = ["data.num_workers=0"]
    assert cli(tmp_path / "straight", shards, *common).returncode == 0
    run = tmp_path / "interrupted"
    killed = cli(run, shards, *common, "+callbacks.kill._target_=faults.KillAtStep", "+callbacks.kill.step=4")
    assert killed.returncode == -signal.SIGKILL
    before = rows(run)
    assert before and max(int(r["step"]) for r in before) >= 2
    resumed = cli(run, shards, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing the" in resumed.stdout + resumed.stderr
    after, straight = rows(run), rows(tmp_path / "straight")
    # one continuous history, step for step the uninterrupted run's (resume is exact), timings aside
    keep = [k for k in straight[0] if not k.startswith("perf/")]

    def view(table: list[dict[str, str]]) -> list[tuple]:
        return [tuple(row.get(k, "") for k in keep) for row in table]

    assert view(after) == view(straight)
    assert view(after)[: len(before)] == view(before)


def test_the_csv_logger_drops_the_rows_an_interrupted_run_logged_after_its_checkpoint(tmp_path: Path) -> None:
    from trainer.loggers import CSVLogger

    first = CSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    second = CSVLogger(tmp_path, name="csv", version="")
    second.continue_from(4)  # the checkpoint it resumes from is step 4: steps 4 and 5 are logged again
    second.log_metrics({"loss": 40.0, "lr": 0.1}, step=4)
    second.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert [(r["step"], r["loss"], r["lr"]) for r in table] == [
        *[(str(s), str(float(s)), "") for s in range(4)],
        ("4", "40.0", "0.1"),
    ]
    fresh = CSVLogger(tmp_path, name="csv", version="")
    fresh.continue_from(0)  # a fresh start in the same folder starts a fresh history
    fresh.log_metrics({"loss": 1.0}, step=0)
    fresh.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == 1


# -- 4. one live run per folder ------------------------------------------------------------------------------------


def hold_lock(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from trainer.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_live_folder_is_refused_and_a_dead_holder_s_folder_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        with pytest.raises(RunFolderInUseError, match=f"pid {holder.pid} on .* stop that run first"):
            RunLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(folder):  # the kernel released the dead holder's lock
        pass


def test_a_requeued_slurm_job_takes_over_its_predecessor_s_stale_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    holder = hold_lock(folder)  # stands for a lock a dead node left on a shared filesystem
    try:
        with pytest.raises(RunFolderInUseError, match="SLURM job 4242"):  # the same attempt: another srun step
            RunLock(folder).acquire()
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued attempt
        start = time.monotonic()
        lock = RunLock(folder, takeover_wait=1.5).acquire()
        assert time.monotonic() - start >= 1.5
        lock.release()
        monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: refused at once
        with pytest.raises(RunFolderInUseError, match="SLURM job 4242"):
            RunLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.slow
def test_the_cli_refuses_a_live_run_folder_and_cleans_a_dead_run_s_temporaries(tmp_path: Path, shards: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    orphan = run / "checkpoints" / ".step00000004.ckpt.tmp-999999"
    orphan.write_bytes(b"half a checkpoint")
    holder = hold_lock(run)
    try:
        line = one_line_error(cli(run, shards))
        assert "is in use by another live run" in line and str(holder.pid) in line
        assert not (run / "config.yaml").exists()  # nothing of the live run's was touched
        assert orphan.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    result = cli(run, shards, "trainer.max_steps=2", "logger=none")  # logger=none: no LearningRateMonitor
    assert result.returncode == 0, result.stderr[-3000:]
    assert not orphan.exists() and "left by a write that was killed" in result.stdout + result.stderr


def test_orphaned_temporaries_are_found_below_a_folder(tmp_path: Path) -> None:
    (tmp_path / "clip").mkdir()
    orphans = [tmp_path / ".last.ckpt.tmp-123", tmp_path / "clip" / ".open_clip_model.safetensors.tmp"]
    keep = [tmp_path / "last.ckpt", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in orphans + keep:
        path.write_bytes(b"x")
    assert sorted(remove_orphaned_temporaries(tmp_path)) == sorted(orphans)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in orphans)


# -- 5. resume picks the highest step ------------------------------------------------------------------------------


def test_resume_picks_the_highest_step_not_the_newest_file(tmp_path: Path) -> None:
    def save(name: str, step: int, mtime: int) -> None:
        atomic_torch_save({"state_dict": {}, "global_step": step}, tmp_path / name)
        os.utime(tmp_path / name, (mtime, mtime))

    save("last.ckpt", 3, 100)  # a copied folder: last.ckpt got the oldest time
    save("step00000002.ckpt", 2, 200)
    save("step00000001.ckpt", 1, 300)
    assert find_resume_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    save("step00000003.ckpt", 3, 400)  # equal steps: the newer file
    assert find_resume_checkpoint(tmp_path) == tmp_path / "step00000003.ckpt"


# -- 7. messages instead of tracebacks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("experiment", "overrides", "expected"),
    [
        ("shapes_clip", ["model=clip/tiny", "data.image_size=63", "data.val_image_size=64"], "data.val_image_size=64, but"),
        ("shapes_autoencoder", ["model=autoencoder/tiny_f4", "data.image_size=63"], "data.image_size=63 is not a multiple of 4"),
        ("shapes_clip", ["task.optimizer.lr=-1"], "task.optimizer.lr must be positive, got -1"),
    ],
)  # fmt: skip
def test_a_wrong_value_stops_before_any_data_is_written(
    tmp_path: Path, experiment: str, overrides: list[str], expected: str
) -> None:
    shapes = tmp_path / "shapes"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", f"experiment={experiment}", "debug=fast", *overrides]
        + [f"data.prepare.out_dir={shapes}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = one_line_error(result)
    assert expected in line
    assert not shapes.exists()  # the shared shapes shards were not (re)written


def test_unquoted_brace_patterns_get_a_message_before_hydra_parses_them(tmp_path: Path) -> None:
    assert "quote the value for Hydra" in check_brace_overrides(["data.train.urls=/d/{000..009}.tar"])
    assert "quote each pattern inside it" in check_brace_overrides(
        ["data.train.urls=[{urls: a/{000..099}.tar, weight: 3}]"]
    )
    assert "the shell expanded" in check_brace_overrides(["data.train.urls=/d/000.tar", "data.train.urls=/d/001.tar"])
    for fine in (["data.train.urls='/d/{000..009}.tar'"], ["data.train.urls=[{urls: 'a/{0..9}.tar'}]"]):
        assert check_brace_overrides(fine) is None
    assert check_brace_overrides(["task.lora={rank: 8}", "trainer.devices=2"]) is None
    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", "experiment=shapes_clip", "data.train.urls=/d/{000..009}.tar"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "data.train.urls=\"'/d/{000..009}.tar'\"" in one_line_error(result)


def test_a_full_disk_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(obj, handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*last\.ckpt; the previous"):
        atomic_torch_save({"x": 1}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []  # no partial file left
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    error.__context__ = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.csv"))
    assert user_message(error).startswith(f"no space left on device writing {tmp_path / 'metrics.csv'}")
    assert user_message(RuntimeError("something else")) is None


@pytest.mark.slow
def test_a_run_that_fills_its_disk_stops_in_one_line(tmp_path: Path, shards: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    # a 1 MiB filesystem: the config and logs fit, a checkpoint of the tiny CLIP (tens of MB) does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    try:
        line = one_line_error(cli(full / "run", shards, "data.num_workers=0"))
        assert "no space left on device writing" in line and str(full) in line
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_the_surviving_ddp_rank_says_which_rank_died_in_one_line(tmp_path: Path, shards: Path) -> None:
    result = cli(
        tmp_path / "run",
        shards,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "data.num_workers=0",
        "+callbacks.kill._target_=faults.KillAtStep",
        "+callbacks.kill.step=3",
        "+callbacks.kill.rank=1",
    )
    line = one_line_error(result)
    assert "rank 0 of 2 stopped: local rank 1 (killed by SIGKILL" in line


def test_the_library_imports_neither_lightning_nor_hydra(tmp_path: Path) -> None:
    """ARCHITECTURE.md's principle 3, in a fresh interpreter: importing the library, and reading weights with it."""
    code = (
        "import sys, torch, trainer.models.unet, trainer.models.autoencoder, trainer.models.clip, "
        "trainer.models.lpips, trainer.diffusion.samplers, trainer.data.pipeline, trainer.data.shards, "
        "trainer.checkpoints, trainer.generate\n"
        "from trainer.checkpoints import torch_load, atomic_torch_save\n"
        "atomic_torch_save({'w': torch.zeros(2)}, sys.argv[1]); torch_load(sys.argv[1])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'lightning_fabric', 'pytorch_lightning', 'hydra', 'omegaconf')}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "weights.pt")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_documented_brace_patterns_reach_hydra_quoted() -> None:
    import re
    import shlex

    documents = [REPO / "README.md", REPO / "slurm" / "README.md", REPO / "data" / "laion" / "README.md"]
    documents += sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "slurm").glob("*.sbatch"))
    checked = 0
    for document in documents:
        for line in document.read_text().splitlines():
            line = line.strip().lstrip("#").strip().removesuffix("\\")
            for command in re.findall(r"`([^`]+)`", line) or [line]:  # in prose, its code spans
                if "urls=" in command and re.search(r"\{\d+\.\.\d+\}", command):
                    assert check_brace_overrides(shlex.split(command, comments=True)) is None, command
                    checked += 1
    assert checked >= 10


def test_a_fresh_start_in_a_folder_with_checkpoints_is_refused(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from trainer.errors import ConfigError
    from trainer.train import resume_checkpoint

    cfg = OmegaConf.create({"ckpt_path": None, "resume": "never", "paths": {"checkpoint_dir": str(tmp_path)}})
    assert resume_checkpoint(cfg) == (None, 0)
    atomic_torch_save({"state_dict": {}, "global_step": 10000}, tmp_path / "step00010000.ckpt")
    # a requeue of the fresh run (resume=auto) would otherwise pick the earlier run's step 10000
    with pytest.raises(ConfigError, match="holds an earlier run's checkpoints .*step00010000.ckpt"):
        resume_checkpoint(cfg)
    cfg.resume = "auto"
    assert resume_checkpoint(cfg) == (str(tmp_path / "step00010000.ckpt"), 10000)
