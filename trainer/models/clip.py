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
    """A CLIP state dict from an open_clip checkpoint, a safetensors file, or one of our Lightning
    checkpoints (whose ``model.`` prefix is removed). Pickles are read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"CLIP weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if any(k.startswith("model.") for k in state):  # our CLIPTask checkpoint
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if any(k.startswith("module.") for k in state):  # a DDP-wrapped open_clip checkpoint
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights strictly; a mismatched file fails with its missing and unexpected keys listed."""
    state = read_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"CLIP weights {path} do not match the model config: "
            f"missing keys {result.missing_keys[:10]}{' ...' if len(result.missing_keys) > 10 else ''}, "
            f"unexpected keys {result.unexpected_keys[:10]}{' ...' if len(result.unexpected_keys) > 10 else ''}"
        )
