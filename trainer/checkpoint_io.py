"""The Lightning side of checkpoint files: the CheckpointIO plugin every run uses (``trainer.train``). The reading
and writing themselves are the library's (:mod:`trainer.checkpoints`), which imports no Lightning."""

from __future__ import annotations

from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from trainer.checkpoints import atomic_torch_save, is_url, torch_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes (see :func:`~trainer.checkpoints.atomic_torch_save`);
    remote URLs (``s3://`` ...) go through Lightning's own writer. Every read, local or remote, goes through
    :func:`~trainer.checkpoints.torch_load` (``weights_only=True``): Lightning's own loader unpickles URLs with
    ``weights_only=False``, which runs whatever code the file holds; the ``weights_only`` asked for is ignored."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if is_url(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch_load(path, map_location=map_location if map_location is not None else "cpu")
