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
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning_fabric.plugins import CheckpointIO, ClusterEnvironment
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_only

from trainer.callbacks.preemption import Preemption
from trainer.callbacks.resume import ExactResume
from trainer.checkpoints import AtomicCheckpointIO, atomic_write_bytes, find_resume_checkpoint
from trainer.errors import ConfigError, UserError
from trainer.strategies import check_strategy

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
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}_{task}" if task and "SLURM_ARRAY_JOB_ID" in os.environ else f"slurm-{job}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """``ckpt_path`` when given; with ``resume=auto``, the newest complete checkpoint of this run's folder."""
    if cfg.ckpt_path:
        return str(cfg.ckpt_path)
    resume = cfg.get("resume", "auto")
    if resume in (None, False, "never"):
        return None
    if resume != "auto":
        raise ConfigError(f"resume must be 'auto' or 'never', got {resume!r}; a file to resume from goes in ckpt_path")
    found = find_resume_checkpoint(cfg.paths.checkpoint_dir)
    if found is not None:
        log.info("resuming from %s", found)
    return str(found) if found is not None else None


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
    seed = pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resume_checkpoint(cfg)
    _wandb_ids(cfg, output_dir)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    task = instantiate(cfg.task)
    datamodule = instantiate(cfg.data, tokenizer=data_tokenizer(task))
    callbacks = [*_instantiate_group(cfg.callbacks), ExactResume(seed)]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.pop("plugins", None)
    trainer: pl.Trainer = instantiate(
        trainer_cfg, callbacks=callbacks, logger=_instantiate_group(cfg.logger) or False, plugins=_plugins(cfg)
    )
    check_strategy(task, trainer.strategy)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Exception as error:
        # Input or configuration that cannot work: one clear line, no stack trace.
        user_error = _user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _user_error(error: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``error``: itself, or its cause when Hydra's instantiate wrapped an error
    raised in a constructor (a task's or the datamodule's) into an InstantiationException."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__ if isinstance(error, InstantiationException) else None
    return error


if __name__ == "__main__":
    main()
