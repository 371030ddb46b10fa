"""Entry point: ``python -m trainer.train experiment=NAME key=value ...`` (or ``latentloom-train``).

Composes the config, builds the task, data, callbacks, loggers and trainer it names, and fits.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from datetime import datetime
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from trainer.callbacks.learning_rate import ConfiguredLearningRate
from trainer.callbacks.preemption import Preemption
from trainer.callbacks.resume import ExactResume
from trainer.checkpoint_io import AtomicCheckpointIO
from trainer.checkpoints import (
    atomic_write_bytes,
    checkpoint_step,
    find_resume_checkpoint,
    is_url,
    remove_orphaned_temporaries,
)
from trainer.cli_errors import check_brace_overrides, peer_failure, user_message
from trainer.errors import CheckpointError, ConfigError
from trainer.loggers import continue_logs
from trainer.run_lock import RunLock, slurm_job
from trainer.strategies import check_strategy
from trainer.tasks.optimization import check_optimizer

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers); null entries are off."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def run_id() -> str:
    """The name of a run's folder: ``slurm-<job id>`` under SLURM (the same folder again when the job is
    requeued, which is how a preempted job finds its checkpoint), else the start date and time."""
    job = slurm_job()
    return f"slurm-{job}" if job else datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)


def resume_checkpoint(cfg: DictConfig) -> tuple[str | None, int | None]:
    """(checkpoint, its global step): ``ckpt_path`` when given (a local file is checked first, cheaply); with
    ``resume=auto``, the complete checkpoint of this run's folder with the highest step; (None, 0) for a fresh
    start. A URL is read when training starts: its step is not known before (None)."""
    if cfg.ckpt_path:
        path = str(cfg.ckpt_path)
        if is_url(path):
            return path, None
        step, why = checkpoint_step(path)
        if step is None:
            raise CheckpointError(f"ckpt_path: {why}" if "does not exist" in why else f"ckpt_path={path}: {why}")
        return path, step
    resume = cfg.get("resume", "auto")
    if resume in (None, False, "never"):
        earlier = find_resume_checkpoint(cfg.paths.checkpoint_dir)
        if earlier is not None:  # a later resume=auto (a requeue) would pick the earlier run's higher steps
            raise ConfigError(
                f"resume=never, but {cfg.paths.checkpoint_dir} holds an earlier run's checkpoints (up to "
                f"{earlier.name}): start the fresh run in a folder of its own (another hydra.run.dir), or move them"
            )
        return None, 0
    if resume != "auto":
        raise ConfigError(f"resume must be 'auto' or 'never', got {resume!r}; a file to resume from goes in ckpt_path")
    found = find_resume_checkpoint(cfg.paths.checkpoint_dir)
    if found is None:
        return None, 0
    step = checkpoint_step(found)[0] or 0
    log.info("resuming from %s (step %d)", found, step)
    return str(found), step


def check_image_sizes(task: pl.LightningModule, data: DictConfig) -> None:
    """The data's square image sizes against what the task's models take, before any data is read or written
    (the shapes data is generated at ``data.image_size``). Buckets check their own sizes."""
    if not hasattr(task, "check_image_size") or data.get("buckets"):
        return
    for key in ("image_size", "val_image_size"):
        size = data.get(key)
        if size is not None:
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"data.{key} must be a positive number of pixels, got {size!r}")
            task.check_image_size(size, f"data.{key}")


def _wandb_ids(cfg: DictConfig, output_dir: Path) -> None:
    """A resumed run logs into the same wandb run: its id is kept in the run folder."""
    for entry in (cfg.logger or {}).values():
        if entry is not None and str(entry.get("_target_", "")).endswith("WandbLogger") and not entry.get("id"):
            id_file = output_dir / "wandb_id"
            if not id_file.exists():
                if rank_zero_only.rank != 0:  # only rank 0 logs; under srun all ranks get here at once
                    continue
                atomic_write_bytes(id_file, uuid.uuid4().hex[:12].encode())
            with open_dict(entry):
                entry.id = id_file.read_text().strip()
                entry.resume = "allow"


def _plugins(cfg: DictConfig) -> list:
    plugins = [instantiate(p) for p in (cfg.trainer.get("plugins") or [])]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))  # trainer.callbacks.preemption requeues instead
    return plugins


def data_tokenizer(task: pl.LightningModule):
    """The tokenizer the data loaders run on every batch's captions (``batch["tokens"]``), or None: only a task
    that reads those tokens names one (CLIP). The LDM encodes its captions itself, after caption dropout, and
    on cached embeddings not at all, so tokens made in its loader workers were work thrown away (16 % of the
    workers' time on the demo's cached latents, on cores the UNet needs)."""
    return getattr(task, "tokenizer", None)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job from a composed config; returns the final logged metrics."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # One live run per folder: the first process holds the lock (the other ranks train under it)
    lock = RunLock(output_dir) if rank_zero_only.rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        return _train(cfg, output_dir, is_first_process=lock is not None, folder_is_ours=bool(lock and lock.held))
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, output_dir: Path, is_first_process: bool, folder_is_ours: bool) -> dict[str, float]:
    seed = pl.seed_everything(cfg.seed, workers=True)
    if folder_is_ours:  # no live process writes here (the lock): a temporary file is a killed write's
        for orphan in remove_orphaned_temporaries(output_dir / "checkpoints") + remove_orphaned_temporaries(
            output_dir / "export"
        ):
            log.info("removed %s, left by a write that was killed", orphan)
    ckpt_path, start_step = resume_checkpoint(cfg)
    _wandb_ids(cfg, output_dir)
    if is_first_process:
        atomic_write_bytes(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    optimizer = cfg.task.get("optimizer") or {}
    check_optimizer(**{key: optimizer.get(key) for key in ("lr", "betas", "eps", "weight_decay")})  # before any data
    task = instantiate(cfg.task)
    check_image_sizes(task, cfg.data)
    datamodule = instantiate(cfg.data, tokenizer=data_tokenizer(task))
    loggers = _instantiate_group(cfg.logger)
    if start_step is not None:  # a resumed run continues its history, a fresh one starts it anew
        continue_logs(loggers, start_step)
    # every run: exact resume, and on resume the configured learning rate over the checkpoint's
    callbacks = [*_instantiate_group(cfg.callbacks), ExactResume(seed), ConfiguredLearningRate()]
    if not loggers:  # logger=none: Lightning refuses a LearningRateMonitor without a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.pop("plugins", None)
    trainer: pl.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=_plugins(cfg))
    check_strategy(task, trainer.strategy)
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    except Exception as error:
        failure = peer_failure(error, trainer)
        if failure is not None:
            raise failure from error
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    preempted = any(isinstance(c, Preemption) and c.preempted for c in callbacks)
    if trainer.is_global_zero and not preempted:
        _link_latest(output_dir)
        log.info("run folder: %s", output_dir)
    return metrics


def _link_latest(output_dir: Path) -> None:
    """``<experiment folder>/latest`` names the newest finished run, so later stages can refer to
    ``outputs/shapes_clip/latest/export/clip`` without knowing the timestamp."""
    link = output_dir.parent / "latest"
    # a name of its own per process: the jobs of a sweep share the parent folder and may finish together
    tmp = output_dir.parent / f".latest.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(output_dir.name)
    tmp.replace(link)  # atomic: readers see the old or the new run, never none


def main() -> None:
    """The console entry point: overrides Hydra cannot parse get one line here, then Hydra runs the job."""
    problem = check_brace_overrides(sys.argv[1:])
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Exception as error:
        # Input or configuration that cannot work: one clear line, no stack trace.
        message = user_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
