"""CLIP models come from open_clip: built by its factory from a model name or a config dict,
tokenized with its tokenizer, weights loaded strictly from a local file. Nothing is written by
hand and nothing is downloaded."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from trainer.errors import ConfigError, MissingFileError

# open_clip's clamp of the learned temperature: logit_scale = log(1 / T) stays in [0, log(100)].
LOGIT_SCALE_MAX = math.log(100)


def _register_config(name: str, config: Mapping[str, Any]) -> None:
    """Make a config dict known to open_clip's factory under ``name`` (its public add_model_config)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


def build_clip(
    name: str, config: Mapping[str, Any] | None = None, pretrained: str | None = None, siglip: bool = False
) -> tuple[nn.Module, Any]:
    """An open_clip model and its tokenizer.

    ``name`` is an open_clip model name (``ViT-B-32``); with ``config`` (open_clip's model-config
    schema: embed_dim, vision_cfg, text_cfg) a custom architecture is registered under ``name``
    first. ``pretrained`` is a local weights file (see :func:`load_clip_weights`). ``siglip`` adds
    the learned logit bias that the sigmoid loss needs, initialised as in the SigLIP paper.
    """
    if config is not None:
        _register_config(name, dict(config))
    elif name not in open_clip.list_models():
        raise ConfigError(f"open_clip has no model named {name!r}; give model.config for a custom one")
    kwargs: dict[str, Any] = {"output_dict": True}
    if siglip:
        kwargs.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    model = open_clip.create_model(name, pretrained=None, **kwargs)
    if pretrained:
        load_clip_weights(model, pretrained)
    return model, open_clip.get_tokenizer(name)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict from an open_clip checkpoint, a safetensors file, one of our Lightning
    checkpoints (whose ``model.`` prefix is removed), or an export folder (``export/clip``: its
    safetensors file). Pickles are read with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir():
        from trainer.checkpoints import OPEN_CLIP_WEIGHTS

        if not (path / OPEN_CLIP_WEIGHTS).is_file():
            raise MissingFileError(
                f"{path} is a folder without {OPEN_CLIP_WEIGHTS}: is it a CLIP export (export/clip)?"
            )
        path = path / OPEN_CLIP_WEIGHTS
    if not path.is_file():
        raise MissingFileError(f"CLIP weights file {path} does not exist")
    from trainer.checkpoints import read_safetensors, torch_load

    if path.suffix == ".safetensors":
        state = read_safetensors(path)[0]
    else:
        state = torch_load(path, what="CLIP weights file")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if any(k.startswith("model.") for k in state):  # our CLIPTask checkpoint
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if any(k.startswith("module.") for k in state):  # a DDP-wrapped open_clip checkpoint
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights strictly; a mismatched file fails with its missing and unexpected keys listed."""
    from trainer.checkpoints import load_strict

    load_strict(model, read_state_dict(path), f"CLIP weights {path}")  # missing, unexpected and mis-shaped keys


def clip_model_config(name: str, config: Mapping[str, Any] | None = None) -> dict:
    """The open_clip model config (embed_dim, vision_cfg, text_cfg, ...) of a name or a custom config."""
    if config is not None:
        return dict(config)
    found = open_clip.get_model_config(name)
    if found is None:
        raise ConfigError(f"open_clip has no model named {name!r}")
    return found


def export_clip(model: nn.Module, name: str, config: Mapping[str, Any] | None, out_dir: str | Path) -> Path:
    """Write an open_clip ``local-dir`` folder (config + safetensors) for ``model``; see
    :func:`trainer.checkpoints.export_open_clip`."""
    from trainer.checkpoints import export_open_clip

    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    return export_open_clip(model, clip_model_config(name, config), out_dir, preprocess)


def export_clip_checkpoint(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Export the CLIP model of one of our Lightning checkpoints as an open_clip folder."""
    from trainer.checkpoints import load_lightning_checkpoint

    checkpoint = load_lightning_checkpoint(checkpoint_path)
    spec = checkpoint.get("hyper_parameters", {}).get("model")
    if not spec or "name" not in spec:
        raise ConfigError(f"{checkpoint_path} has no CLIP model spec in its hyper_parameters: is it a CLIP checkpoint?")
    siglip = checkpoint["hyper_parameters"].get("loss") == "siglip"
    model, _ = build_clip(spec["name"], spec.get("config"), None, siglip=siglip)
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return export_clip(model, spec["name"], spec.get("config"), out_dir)


def load_clip(source: str | Path | None, name: str | None = None, config: Mapping[str, Any] | None = None):
    """(open_clip model, tokenizer) from our CLIP stage's output or an open_clip file.

    ``source`` may be an export folder (``<run>/export/clip``, holding ``open_clip_config.json``),
    one of our CLIP checkpoints (``.ckpt``; its model spec comes with it), or an open_clip weights
    file (``.safetensors``/``.pt``/``.bin``) for the model ``name`` (or ``config``). With no
    ``source``, ``name``/``config`` give a randomly initialised model (for tests).
    """
    if source is None:
        if name is None:
            raise ConfigError("a CLIP needs a source (a CLIP export or checkpoint) or a model name")
        return build_clip(name, config)
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"CLIP source {path} does not exist (give a CLIP export folder or checkpoint)")
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise ConfigError(f"{path} is not an open_clip export folder: no open_clip_config.json")
        from trainer.checkpoints import OPEN_CLIP_WEIGHTS, safetensors_metadata

        if (path / OPEN_CLIP_WEIGHTS).is_file():
            safetensors_metadata(path / OPEN_CLIP_WEIGHTS)  # a truncated file fails here, naming it
        return open_clip.create_model(f"local-dir:{path}"), open_clip.get_tokenizer(f"local-dir:{path}")
    siglip = False
    if path.suffix == ".ckpt":
        from trainer.checkpoints import torch_load

        checkpoint = torch_load(path, mmap=True)
        hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
        if hparams.get("model", {}).get("name"):
            name, config = hparams["model"]["name"], hparams["model"].get("config")
            siglip = hparams.get("loss") == "siglip"
    if name is None:
        raise ConfigError(f"{path}: give the open_clip model name the weights belong to (e.g. text_encoder.name)")
    clip, tokenizer = build_clip(name, config, siglip=siglip)
    load_clip_weights(clip, path)
    return clip, tokenizer
