"""The config system: every experiment composes, overrides reach the objects, mistakes fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import REPO
from trainer.train import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
# Values a user must give on the command line for experiments on external data.
# Brace patterns are quoted: Hydra's override grammar reads { } as a dict otherwise.
REQUIRED = {
    "data.train.urls": "'/datasets/train-{000000..000009}.tar'",
    "task.text_encoder.source": "/weights/clip-export",
    "task.autoencoder.checkpoint": "/weights/vae.safetensors",
    "task.pretrained": "/weights/sd15.safetensors",
    # the folder fine-tuning recipes (finetune_ldm, finetune_clip, finetune_autoencoder)
    "data.images": "/my/photos",
    "base": "/weights/base.safetensors",
    "text_encoder": "/weights/clip-export",
}


def compose_config(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_there_are_experiments() -> None:
    stages = {"clip", "autoencoder", "ldm"}
    assert {f"shapes_{stage}" for stage in stages} | {"laion_clip_vit_b32", "laion_ldm_sd15", "finetune_sd15"} <= set(
        EXPERIMENTS
    )


def missing_keys(cfg) -> list[str]:
    """The keys left ``???``, found without resolving interpolations (``task.pretrained: ${base}`` with
    ``base: ???`` would fail OmegaConf.missing_keys)."""

    def walk(node, prefix: str):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{prefix}{key}.")
        elif node == "???":
            yield prefix[:-1]

    return list(walk(OmegaConf.to_container(cfg, resolve=False), ""))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(tmp_path: Path, experiment: str) -> None:
    cfg = compose_config(tmp_path, [f"experiment={experiment}"])
    missing = missing_keys(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))
    cfg = compose_config(tmp_path, [f"experiment={experiment}"] + [f"{k}={REQUIRED[k]}" for k in missing])
    resolved = {
        key: OmegaConf.to_container(value, resolve=True, throw_on_missing=True) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "hydra"
    }
    assert resolved["name"] == experiment
    for group in ("data", "task", "trainer"):
        assert "_target_" in resolved[group], group


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_debug_fast(tmp_path: Path, experiment: str) -> None:
    cfg = compose_config(tmp_path, [f"experiment={experiment}", "debug=fast"])
    assert cfg.trainer.max_steps == 2 and cfg.trainer.accelerator == "cpu" and cfg.data.num_workers == 0


def test_overrides_reach_the_objects(tmp_path: Path, shards: Path) -> None:
    cfg = compose_config(
        tmp_path,
        [
            "experiment=shapes_clip",
            "trainer.max_steps=7",
            "data.batch_size=3",
            "data.image_size=32",
            "data.prepare=null",
            f"data.train.urls={shards}/train.manifest.json",
            f"data.val.urls={shards}/val.manifest.json",
            "task.optimizer.lr=0.0123",
            "task.loss=siglip",
            "model.config.embed_dim=16",
            "data.caption_transform=null",  # shapes_clip's captions naming one attribute, and their positives:
            "task.positives=null",  # the InfoNCE loss only, which siglip is not
        ],
    )
    task = instantiate(cfg.task)
    data = instantiate(cfg.data, tokenizer=task.tokenizer)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == 7
    assert data.batch_size == 3 and data.train_transform.size == 32
    assert task.optimizer_cfg["lr"] == 0.0123 and task.hparams.loss == "siglip"
    assert task.model.text_projection.shape[1] == 16
    assert data.caption_transform is None and task.caption_parser is None
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["image"].shape == (3, 3, 32, 32)


def test_shapes_clip_trains_on_single_attribute_captions_with_their_positives(tmp_path: Path) -> None:
    from trainer.data.shapes import AttributeCaptions, caption_attributes

    cfg = compose_config(tmp_path, ["experiment=shapes_clip", "data.prepare=null"])
    data, task = instantiate(cfg.data), instantiate(cfg.task)
    assert isinstance(data.caption_transform, AttributeCaptions) and task.caption_parser is caption_attributes
    assert data.caption_transform.probabilities == {"shape": 0.3, "color": 0.0, "size": 0.0, "position": 0.15}
    # the README's overrides: a share of shapes_clip's transform, and a whole transform where the default is null
    cfg = compose_config(tmp_path, ["experiment=shapes_clip", "data.prepare=null", "data.caption_transform.shape=0.5"])
    assert instantiate(cfg.data).caption_transform.probabilities["shape"] == 0.5
    whole = "data.caption_transform={_target_: trainer.data.shapes.AttributeCaptions, color: 0.2}"
    cfg = compose_config(tmp_path, ["experiment=laion_clip_vit_b32", whole])
    transform = instantiate(cfg.data.caption_transform)
    assert transform.probabilities == {"shape": 0.0, "color": 0.2, "size": 0.0, "position": 0.0}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.train", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_wrong_group_option_names_the_valid_options(tmp_path: Path) -> None:
    result = run_cli("data=nonexistent", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'data/nonexistent'" in result.stderr and "shapes" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_key_fails_with_hydras_message(tmp_path: Path) -> None:
    result = run_cli("trainer.no_such_key=1", cwd=tmp_path)
    assert result.returncode != 0
    assert "no_such_key" in result.stderr and "Traceback" not in result.stderr


def test_bad_input_fails_with_one_clear_line(tmp_path: Path) -> None:
    result = run_cli(
        "debug=fast", "data.prepare=null", f"data.train.urls='{tmp_path}/missing-{{0..3}}.tar'", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "error: data.train: 4 of 4 local shards do not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_cfg_job_prints_the_resolved_config(tmp_path: Path) -> None:
    result = run_cli("experiment=shapes_clip", "trainer.max_steps=123", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.trainer.max_steps == 123 and printed.name == "shapes_clip"


def test_strategy_configs_build_lightning_strategies(tmp_path: Path) -> None:
    from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from trainer.models.unet import ResBlock, SpatialTransformer

    ddp = instantiate(compose_config(tmp_path, ["trainer=ddp"]).trainer.strategy)
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["gradient_as_bucket_view"] is True
    cfg = compose_config(tmp_path, ["experiment=laion_ldm_sd15", "trainer=fsdp"])
    missing = missing_keys(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]))
    cfg = compose_config(
        tmp_path, ["experiment=laion_ldm_sd15", "trainer=fsdp", *[f"{k}={REQUIRED[k]}" for k in missing]]
    )
    fsdp = instantiate(cfg.trainer.strategy)  # built, not launched: FSDP needs GPUs
    assert isinstance(fsdp, FSDPStrategy)
    policy = fsdp.kwargs["auto_wrap_policy"]
    policy = policy if isinstance(policy, ModuleWrapPolicy) else ModuleWrapPolicy(policy)
    assert {ResBlock, SpatialTransformer} <= set(policy._module_classes)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


def test_a_wrong_class_path_in_the_fsdp_config_fails_clearly() -> None:
    from trainer.errors import ConfigError
    from trainer.strategies import fsdp

    with pytest.raises(ConfigError, match="trainer.models.unet.NoSuchBlock"):
        fsdp(wrap=["trainer.models.unet.NoSuchBlock"])


def test_fsdp_refuses_clip_and_the_autoencoder_before_any_work() -> None:
    """torch's FSDP refuses 0-dim parameters deep in its setup (seen on an H100: open_clip's logit_scale, the
    autoencoder loss's logvar); the entry point says so first, and lets the latent diffusion task through."""
    from tiny import AE, CLIP
    from trainer.errors import ConfigError
    from trainer.strategies import check_strategy, fsdp
    from trainer.tasks.autoencoder import AutoencoderTask
    from trainer.tasks.clip import CLIPTask

    strategy = fsdp(wrap=["trainer.models.unet.ResBlock"])
    clip = CLIPTask({"name": "fsdp-test-clip", "config": CLIP})
    with pytest.raises(ConfigError, match=r"cannot shard CLIPTask: .*\(model.logit_scale\).*trainer=ddp"):
        check_strategy(clip, strategy)
    with pytest.raises(ConfigError, match=r"cannot shard AutoencoderTask: .*\(logvar\)"):
        check_strategy(AutoencoderTask(AE), strategy)
    check_strategy(clip, "auto")  # other strategies: nothing to check
    unet = torch.nn.Sequential(torch.nn.Linear(2, 2))  # no 0-dim parameters, as in the LDM task
    check_strategy(unet, strategy)
