"""The sbatch scripts on a real SLURM cluster: slurm/local_cluster.sh starts one on this machine with two
emulated nodes. Jobs train shapes CLIP with DDP on CPU across the two nodes; one is preempted with SIGUSR1,
requeued by the run itself, and resumes from its checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_multinode import losses, one_process

from conftest import write_shards

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A running local cluster for this module; the environment that points SLURM's clients at it."""
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "LATENTLOOM_SLURM_DIR": str(state)}
    started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, f"the local SLURM cluster did not start:\n{started.stderr}"
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)


def job_field(env: dict[str, str], job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else ""


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def shapes_clip_on_cpu(shards: Path) -> list[str]:
    """Overrides for a few CPU steps of shapes CLIP on the test's own shards."""
    return [
        "experiment=shapes_clip",
        "model=clip/tiny",  # a ViT, as in test_multinode: BatchNorm statistics are per rank
        "debug=fast",
        "trainer.accelerator=cpu",
        "data.prepare=null",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        f"data.train.urls={shards}/train.manifest.json",
        f"data.val.urls={shards}/val.manifest.json",
        "task.export=false",
    ]


def submit(env: dict[str, str], workdir: Path, script: str, *overrides: str, nodes: int = 2) -> str:
    shards = workdir / "shards"
    command = [
        "sbatch",
        "--parsable",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--chdir={workdir}",
        "--export=ALL,MASTER_ADDR=127.0.0.1",  # the emulated nodes' names do not resolve
        str(REPO / "slurm" / script),
        *shapes_clip_on_cpu(shards),
        "trainer.strategy=ddp",
        *overrides,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def output_of(workdir: Path, job: str) -> str:
    path = workdir / f"slurm-latentloom-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_two_node_ddp_job_matches_one_process_on_the_same_global_batch(slurm: dict[str, str], tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, "train", 48, 4)  # a shard is one per-rank batch: rank r reads shards r::2
    write_shards(shards, "val", 8, 4, seed=1)
    # as in test_multinode: no sample shuffle, each rank scores the whole global batch
    job = submit(
        slurm, tmp_path, "multinode.sbatch", "trainer.max_steps=3", "data.shuffle_buffer=1", "task.local_loss=false"
    )
    wait_for(lambda: job_field(slurm, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300, f"job {job}")
    out = output_of(tmp_path, job)
    assert job_field(slurm, job, "JobState") == "COMPLETED", out[-3000:]
    assert job_field(slurm, job, "NodeList") == "n[1-2]"
    assert "MEMBER: 1/2" in out and "MEMBER: 2/2" in out  # one rank on each node
    run = tmp_path / "outputs" / "shapes_clip" / f"slurm-{job}"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert losses(run) == pytest.approx(losses(one_process(shards, tmp_path / "single")), rel=1e-3)
    assert len(losses(run)) == 3


def test_sigusr1_checkpoints_requeues_and_the_job_resumes(slurm: dict[str, str], tmp_path: Path) -> None:
    write_shards(tmp_path / "shards", "train", 48, 4)
    write_shards(tmp_path / "shards", "val", 8, 4, seed=1)
    steps = 300
    job = submit(  # the one-node script (the two-node one is tested above)
        slurm,
        tmp_path,
        "train.sbatch",
        f"trainer.max_steps={steps}",
        "trainer.max_epochs=-1",
        "trainer.val_check_interval=1000",
        "callbacks.checkpoint.every_n_train_steps=20",
        nodes=1,
    )
    checkpoints = tmp_path / "outputs" / "shapes_clip" / f"slurm-{job}" / "checkpoints"
    ended = ("COMPLETED", "FAILED", "CANCELLED")
    wait_for(
        lambda: (checkpoints / "step00000020.ckpt").exists() or job_field(slurm, job, "JobState") in ended,
        300,
        "the first checkpoint",
    )
    assert job_field(slurm, job, "JobState") == "RUNNING"
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)  # all tasks of its steps
    wait_for(lambda: int(job_field(slurm, job, "Restarts") or 0) >= 1, 120, "the job to be requeued")
    wait_for(lambda: job_field(slurm, job, "JobState") in ended, 600, "the rerun")
    out = output_of(tmp_path, job)
    assert job_field(slurm, job, "JobState") == "COMPLETED", out[-3000:]
    preempt = sorted(checkpoints.glob("preempt-step*.ckpt"))
    assert len(preempt) == 1, out[-3000:]
    saved_at = torch.load(preempt[0], weights_only=True)["global_step"]
    assert 20 <= saved_at < steps
    assert "restart 1" in out and "requeued SLURM job" in out
    assert f"resuming from {preempt[0]}" in out  # the second run picked the preemption checkpoint
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == steps


def test_a_sweep_is_submitted_through_the_submitit_launcher(slurm: dict[str, str], tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    write_shards(shards, "train", 48, 4)
    write_shards(shards, "val", 8, 4, seed=1)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.train",
            "-m",
            "launcher=slurm",
            *shapes_clip_on_cpu(shards),
            "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1",
            "task.optimizer.lr=1e-4,3e-4",
        ],
        cwd=tmp_path,
        env=slurm,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "shapes_clip").iterdir()
    rates = set()
    for job in ("0", "1"):
        assert torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
        rates |= set(re.findall(r"\blr: (\S+)", (sweep / job / "config.yaml").read_text()))
    assert {"0.0001", "0.0003"} <= rates
    assert len(list((sweep / ".submitit").iterdir())) >= 2  # submitted as SLURM jobs, not run here
