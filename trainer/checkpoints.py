"""Weights on disk: atomic safetensors writes, reading our Lightning checkpoints, and exports in the
layouts other tools load (open_clip's ``local-dir:`` folders for CLIP)."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from trainer.errors import CheckpointError, ConfigError, DiskFullError, MissingFileError

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


def is_url(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a remote file (``http://``, ``s3://`` ...) rather than a local path."""
    text = str(source)
    return "://" in text and not text.startswith("file://")


def _read_remote(url: str) -> bytes:
    """The bytes of a remote file: http(s) with urllib, any other scheme through fsspec (s3fs, gcsfs ...)."""
    if url.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - the user named this URL
            return response.read()
    import fsspec

    with fsspec.open(url, "rb") as handle:
        return handle.read()


def torch_load(source: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False, what: str = "checkpoint"):
    """``torch.load`` of a local file or a URL that never runs code: always ``weights_only=True``, whatever the
    caller or Lightning would choose (Lightning unpickles URLs with ``weights_only=False``). A file that needs
    more than tensors and plain values, or that cannot be read at all, raises :class:`CheckpointError` naming
    it in one line."""
    import pickle

    name = str(source)
    try:
        if is_url(name):
            import io

            try:
                data = _read_remote(name)
            except Exception as error:  # noqa: BLE001 - any reason the fetch failed: HTTP, DNS, a missing fsspec backend
                raise CheckpointError(f"{what} {name} cannot be fetched ({_first_line(error)})") from None
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        path = Path(name.removeprefix("file://"))
        if not path.is_file():
            raise MissingFileError(f"{what} {path} does not exist")
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (MissingFileError, CheckpointError):
        raise
    except pickle.UnpicklingError as error:
        text = str(error)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"(GLOBAL \S+)", text)
        if found:  # the file asks to import and call Python code on load: refused
            raise CheckpointError(
                f"{what} {name} was refused: it holds Python objects ({found.group(1)}) that loading would run as "
                "code, and only tensors and plain values are read. Use a checkpoint written by latentloom or a "
                ".safetensors file from a source you trust"
            ) from None
        raise CheckpointError(f"{what} {name} cannot be read ({_first_line(error)}): {_REWRITE}") from None
    except (OSError, RuntimeError, EOFError, ValueError, ImportError) as error:
        raise CheckpointError(f"{what} {name} cannot be read ({_first_line(error)}): {_REWRITE}") from None


_REWRITE = "it is truncated or not a PyTorch file; copy, download or export it again"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def load_lightning_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint of ours, read without unpickling code (``weights_only=True``)."""
    checkpoint = torch_load(path)
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
        return read_safetensors(path)
    state = torch_load(path, what="weights file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def read_safetensors(path: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (none with ``tensors=False``) and metadata of a ``.safetensors`` file; a truncated or foreign file
    raises :class:`CheckpointError` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
            return state, dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"weights file {path} cannot be read as safetensors ({_first_line(error)}): it is truncated or not a "
            "safetensors file; copy, download or export it again"
        ) from None


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file, without reading its tensors."""
    return read_safetensors(path, tensors=False)[1]


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
    stored = safetensors_metadata(path).get("config")
    return json.loads(stored) if stored else None


def read_scale_factor(path: str | os.PathLike) -> float | None:
    """The latent scale factor stored in a safetensors file's metadata (our autoencoder and LDM exports),
    None for other files: released SD files store none, and a pickle is not loaded just for it."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return None
    stored = safetensors_metadata(path).get("scale_factor")
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
    except (OSError, RuntimeError) as error:
        if disk_full_error(error) is not None:
            raise DiskFullError(
                f"no space left on device writing {path}; the previous checkpoints are intact: free space on that "
                "disk or move the run (paths.output_dir, hydra.run.dir), then resume with the same command"
            ) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return path


def disk_full_error(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error`` (itself, or one it was raised from or during) of a write that failed for lack of
    space, or None (torch's zip writer raises a RuntimeError "unexpected pos" while handling the OSError ENOSPC)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def checkpoint_step(path: str | os.PathLike) -> tuple[int | None, str]:
    """The global step of a Lightning training checkpoint, read cheaply; (None, why) when it is unusable.
    Reading is memory-mapped, so this costs little even for a checkpoint of many GB: a truncated file fails
    here (its zip directory sits at the end), as does anything that is not a checkpoint. It reads with
    ``weights_only=True``, as every load of ours does: what fails here would fail on resume."""
    try:
        checkpoint = torch_load(path, mmap=True)
    except (CheckpointError, MissingFileError) as error:
        return None, str(error)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        return None, "not a Lightning training checkpoint (no state_dict or global_step)"
    return int(checkpoint["global_step"]), ""


def checkpoint_is_complete(path: str | os.PathLike) -> tuple[bool, str]:
    """Whether ``path`` reads back as a Lightning training checkpoint; (False, why) when it does not."""
    step, why = checkpoint_step(path)
    return step is not None, why


def find_resume_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete ``*.ckpt`` in ``directory`` with the highest global step (read from each file; of equal
    steps the newest by modification time), or None if it holds none. Corrupt or truncated files are skipped
    with a warning naming them. The step, not the modification time, decides: a copied or restored folder
    gives every file a new time, and ``last.ckpt`` may be older than a later ``stepN.ckpt``, or newer."""
    import logging

    log = logging.getLogger(__name__)
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.glob("*.ckpt") if p.is_file() and not p.name.startswith(".")]
    readable = []
    for path in candidates:
        step, why = checkpoint_step(path)
        if step is None:
            log.warning("skipping checkpoint %s: it cannot be read (%s)", path, why)
        else:
            readable.append((step, path.stat().st_mtime_ns, path.name, path))
    if readable:
        return max(readable)[3]
    if candidates:
        log.warning("no readable checkpoint in %s: starting from scratch", directory)
    return None


def remove_orphaned_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writes left below ``directory`` (``.NAME.tmp`` and
    ``.NAME.tmp-PID``, see :func:`atomic_torch_save`); returns them. Only for a folder that no live process
    writes to: the run folder's lock (:mod:`trainer.run_lock`) says so."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.rglob(".*.tmp*"):
        if path.is_file() and re.fullmatch(r"\..+\.tmp(-\d+)?", path.name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
