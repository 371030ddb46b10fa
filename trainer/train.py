"""Entry point: ``python -m trainer.train experiment=NAME key=value ...`` (or ``latentloom-train``).

Composes the config, builds the task, data, callbacks, loggers and trainer it names, and fits.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.errors import UserError

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers); null entries are off."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job from a composed config; returns the final logged metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    task = instantiate(cfg.task)
    datamodule = instantiate(cfg.data, tokenizer=getattr(task, "tokenizer", None))
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_group(cfg.callbacks), logger=_instantiate_group(cfg.logger) or False
    )
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        _link_latest(output_dir)
        log.info("run folder: %s", output_dir)
    return metrics


def _link_latest(output_dir: Path) -> None:
    """``<experiment folder>/latest`` names the newest finished run, so later stages can refer to
    ``outputs/shapes_clip/latest/export/clip`` without knowing the timestamp."""
    link = output_dir.parent / "latest"
    tmp = output_dir.parent / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(output_dir.name)
    tmp.replace(link)  # atomic: readers see the old or the new run, never none


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except UserError as error:
        # Input or configuration that cannot work: one clear line, no stack trace.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
