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


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``.safetensors`` file, or of a pickle (``.ckpt``/``.pt``/``.pth``,
    read with ``weights_only=True``) whose tensors may sit under ``state_dict``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def select_prefixed(state: Mapping[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    """The entries under the first of ``prefixes`` that any key starts with, prefix removed; the
    whole state when none does."""
    for prefix in prefixes:
        chosen = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if chosen:
            return chosen
    return dict(state)


def load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists the missing and unexpected keys and
    the shape mismatches, and says what the file was expected to be."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:

        def show(keys: list[str]) -> str:
            return f"{keys[:8]}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"

        raise ConfigError(
            f"{source} does not match the model: {len(missing)} missing keys {show(missing)}, "
            f"{len(unexpected)} unexpected keys {show(unexpected)}, {len(mismatched)} shape mismatches "
            f"{show(mismatched)}. Check that the model config is the one the weights were trained with."
        )
    module.load_state_dict(state, strict=True)


# Where the autoencoder's weights sit in the files we read: a full Stable Diffusion checkpoint
# (first_stage_model.), our autoencoder task's checkpoint (EMA weights first, then the trained ones),
# or a standalone VAE file (no prefix).
VAE_PREFIXES = ("first_stage_model.", "ema.module.", "autoencoder.")


def load_vae_weights(model: torch.nn.Module, path: str | os.PathLike) -> float | None:
    """Load autoencoder weights strictly from any of the layouts above; returns the stored scale
    factor when the file has one (our checkpoints and exports do)."""
    state, metadata = read_weights(path)
    load_strict(model, select_prefixed(state, *VAE_PREFIXES), f"autoencoder weights {path}")
    if "scale_factor" in state:
        return float(state["scale_factor"])
    if "scale_factor" in metadata:
        return float(metadata["scale_factor"])
    return None


def export_vae(
    model: torch.nn.Module, path: str | os.PathLike, scale_factor: float | None = None, config: dict | None = None
) -> Path:
    """The autoencoder alone as safetensors in the original SD layout (``encoder.*``, ``decoder.*``,
    ``quant_conv.*``, ``post_quant_conv.*``), with the scale factor and the model config (``embed_dim``,
    ``ddconfig``) in the metadata, so the diffusion stage needs nothing but the file."""
    metadata = {"format": "pt"}
    if scale_factor is not None:
        metadata["scale_factor"] = repr(float(scale_factor))
    if config is not None:
        metadata["config"] = json.dumps(config)
    return save_safetensors(model.state_dict(), path, metadata)


def read_vae_config(path: str | os.PathLike) -> dict | None:
    """The model config stored in an autoencoder export's metadata (None for other files)."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = (f.metadata() or {}).get("config")
    return json.loads(stored) if stored else None


def read_scale_factor(path: str | os.PathLike) -> float | None:
    """The latent scale factor stored in a safetensors file's metadata (our autoencoder and LDM exports),
    None for other files: released SD files store none, and a pickle is not loaded just for it."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = (f.metadata() or {}).get("scale_factor")
    return float(stored) if stored else None


# -- Lightning checkpoints: atomic writes, and finding the newest complete one to resume from -----------------------


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform/filesystem lets a directory be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``:
    a crash at any moment leaves either the previous file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def _checkpoint_io_base():
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    return TorchCheckpointIO


class AtomicCheckpointIO(_checkpoint_io_base()):
    """Lightning's checkpoint IO with atomic local writes (see :func:`atomic_torch_save`); remote URLs
    (``s3://`` ...) go through Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


def checkpoint_is_complete(path: str | os.PathLike) -> tuple[bool, str]:
    """Whether ``path`` reads back as a Lightning training checkpoint; (False, why) when it does not.
    Reading is memory-mapped, so this costs little even for a checkpoint of many GB: a truncated file
    fails here (its zip directory sits at the end), as does anything that is not a checkpoint. It reads
    with ``weights_only=True``, as Lightning does when it resumes: what fails here would fail there."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any reason it cannot be read makes it unusable
        return False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        return False, "not a Lightning training checkpoint (no state_dict or global_step)"
    return True, ""


def find_resume_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete ``*.ckpt`` in ``directory`` (by modification time), or None if it holds none.
    Corrupt or truncated files are skipped with a warning naming them, falling back to older ones."""
    import logging

    log = logging.getLogger(__name__)
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True):
        ok, why = checkpoint_is_complete(path)
        if ok:
            return path
        log.warning("skipping checkpoint %s: it cannot be read (%s); trying an older one", path, why)
    if candidates:
        log.warning("no readable checkpoint in %s: starting from scratch", directory)
    return None
