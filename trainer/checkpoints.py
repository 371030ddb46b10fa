"""Weights on disk: atomic safetensors writes, reading our Lightning checkpoints, and exports in the
layouts other tools load (open_clip's ``local-dir:`` folders for CLIP)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer.errors import ConfigError, MissingFileError

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Save tensors as safetensors, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of ours, read without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no 'state_dict'); give a .ckpt from a run folder")
    return checkpoint


def export_open_clip(
    model: torch.nn.Module, model_config: Mapping[str, Any], out_dir: str | os.PathLike, preprocess: dict | None = None
) -> Path:
    """Write ``model`` as an open_clip ``local-dir`` folder: config json + safetensors weights.

    Load it with ``open_clip.create_model("local-dir:OUT_DIR")`` (or, for a built-in architecture,
    ``open_clip.create_model(NAME, pretrained="OUT_DIR/open_clip_model.safetensors")``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out_dir / OPEN_CLIP_WEIGHTS, metadata={"format": "pt"})
    config = {"model_cfg": dict(model_config), "preprocess_cfg": dict(preprocess or {})}
    atomic_write_bytes(out_dir / OPEN_CLIP_CONFIG, json.dumps(config, indent=1).encode())
    return out_dir
