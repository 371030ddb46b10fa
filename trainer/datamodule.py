"""The Lightning side of the data layer: builds train/val :class:`ShardDataset` loaders per rank.

Rank and world size come from the trainer at ``setup()`` time (after the distributed environment
exists), so each rank streams its own part of the shards. ``prepare`` (e.g. generating the shapes
shards when missing) runs once, on the first rank of each node, before that.
:class:`FolderDataModule` is the same over a user's folder of images, made into shards on first use.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device

from trainer.data import folders
from trainer.data.buckets import Buckets
from trainer.data.pipeline import SampleFilter, ShardDataset, ShardLoader
from trainer.data.shards import manifest_path
from trainer.data.sources import resolve_sources
from trainer.data.transforms import MAX_IMAGE_PIXELS, ImageTransform
from trainer.errors import ConfigError

log = logging.getLogger(__name__)
# Lightning warns that an IterableDataset's __len__ may be off with several workers; ours is exact
# (ShardDataset gives each worker its share of the batches), so the warning would only mislead.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)


class ShardDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train: Mapping[str, Any],
        val: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int = 256,
        val_image_size: int | None = None,
        resize_size: int | None = None,
        crop: str = "center",
        flip: bool = False,
        normalize: str | list = "clip",
        caption_key: str = "txt",
        require_caption: bool = True,
        filters: Mapping[str, Any] | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        pin_memory: bool | None = None,
        prepare: Callable[[], Any] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        buckets: Mapping[str, Any] | None = None,
        caption_transform: Callable[[str, dict, Any], str] | None = None,
        max_skipped_fraction: float | None = 0.9,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ):
        super().__init__()
        if "urls" not in train:
            raise ConfigError("data.train needs 'urls' (a brace pattern, a list, a manifest, or weighted sources)")
        self.train_spec, self.val_spec = dict(train), dict(val or {})
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers = num_workers
        self.normalize = normalize if isinstance(normalize, str) else [list(v) for v in normalize]
        self.train_transform = ImageTransform(image_size, crop, flip, self.normalize, resize_size=resize_size)
        # validation may see whole images where training sees crops (a convolutional autoencoder trained on patches)
        self.val_transform = ImageTransform(
            val_image_size or image_size, "center", False, self.normalize, resize_size=resize_size
        )
        self.caption_key, self.require_caption = caption_key, require_caption
        self.filters = SampleFilter(**filters) if filters else None
        # aspect-ratio buckets for training and validation (None: square image_size crops); see trainer/data/buckets.py
        self.buckets = Buckets.from_config(buckets, "data.buckets")
        if self.buckets is not None and resize_size is not None:
            log.warning(
                "data.resize_size=%s is not used with data.buckets: each image is scaled to cover its bucket's size "
                "and cropped only where the aspect ratios differ (no square patches)",
                resize_size,
            )
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        # a run stops when more of its samples than this are faults (null: never); larger images are skipped unread
        self.max_skipped_fraction, self.max_image_pixels = max_skipped_fraction, max_image_pixels
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prepare, self.tokenizer = prepare, tokenizer
        if caption_transform is not None and not callable(caption_transform):
            raise ConfigError(
                f"data.caption_transform must be a callable (caption, meta, rng) -> caption, e.g. "
                f"{{_target_: trainer.data.shapes.AttributeCaptions, shape: 0.3}}; got {caption_transform!r}"
            )
        self.caption_transform = caption_transform  # training only: validation scores the captions as written
        self.train_set: ShardDataset | None = None
        self.val_set: ShardDataset | None = None

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _dataset(self, spec: dict, *, train: bool, num_workers: int) -> ShardDataset:
        rank, world_size = self._rank_world()
        return ShardDataset(
            spec["urls"],
            batch_size=self.batch_size if train else self.val_batch_size,
            mode=spec.get("mode", "exact"),
            epoch_length=spec.get("epoch_length"),
            transform=self.train_transform if train else self.val_transform,
            caption_key=self.caption_key,
            require_caption=self.require_caption,
            filters=self.filters,
            tokenizer=self.tokenizer,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            # with buckets, drop_partial decides (default: keep the partial batches, every sample once an epoch)
            drop_last=train and self.buckets is None,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            name="data.train" if train else "data.val",
            buckets=self.buckets,
            caption_transform=self.caption_transform if train else None,
            max_skipped_fraction=self.max_skipped_fraction,
            max_image_pixels=self.max_image_pixels,
        )

    def val_workers(self) -> int:
        """Validation reads in exact mode; use no more workers than each rank has shards for."""
        _, world_size = self._rank_world()
        shards = sum(len(s.urls) for s in resolve_sources(self.val_spec["urls"]))
        return max(0, min(self.num_workers, shards // max(world_size, 1)))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset(self.train_spec, train=True, num_workers=self.num_workers)
        if self.val_set is None and self.val_spec.get("urls"):
            self.val_set = self._dataset(self.val_spec, train=False, num_workers=self.val_workers())

    # An epoch that data.filters empty stops the run too (the library's loader only warns): training on nothing
    # would go through empty epochs forever, or finish at once and export the untrained model
    def train_dataloader(self) -> ShardLoader:
        return ShardLoader(
            self.train_set,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            even_ranks=True,
            allow_filtered_out=False,
        )

    def val_dataloader(self) -> ShardLoader | list:
        if self.val_set is None:
            return []
        return ShardLoader(
            self.val_set, num_workers=self.val_workers(), pin_memory=self.pin_memory, allow_filtered_out=False
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A batch's tensors to the device, without walking its captions, keys, urls, json and fault counts.
        Lightning's default walks every value recursively: ~2-3 ms a step for 32 samples' json on a CPU, a few
        percent of a small model's step, and on a GPU the largest overhead a batch carries (docs/benchmarks.md,
        "CLIP training step"). Any other value, and a batch that is not a dict, goes Lightning's way."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {
            name: value if name in ShardDataset.HOST_ONLY else move_data_to_device(value, device)
            for name, value in batch.items()
        }


class FolderDataModule(ShardDataModule):
    """A :class:`ShardDataModule` over a folder of images with ``.txt`` captions, or a caption table
    (``images``), turned into shards on first use in a folder of ``cache_dir`` named after it, and reused
    while it is unchanged (:func:`trainer.data.folders.ensure_folder_shards`, with the ``ingest`` options).
    The shard URLs are that folder's manifests: ``train.manifest.json`` and, when ``ingest.val_fraction``
    is above 0, ``val.manifest.json``. Every other argument is :class:`ShardDataModule`'s."""

    def __init__(
        self,
        images: str,
        cache_dir: str,
        ingest: Mapping[str, Any] | None = None,
        train: Mapping[str, Any] | None = None,
        val: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        source = Path(images).expanduser()
        folders.check_input(source, "data.images")  # on every rank, before any waits for the first one's prepare
        options = dict(ingest or {})
        shards = folders.cache_dir(source, cache_dir)
        train = {**(train or {}), "urls": str(manifest_path(shards, "train"))}
        with_val = options.get("val_fraction", folders.VAL_FRACTION) > 0
        val = {**(val or {}), "urls": str(manifest_path(shards, "val")) if with_val else None}
        prepare = partial(folders.ensure_folder_shards, source, shards, **options)
        super().__init__(train, val, prepare=prepare, **kwargs)
        self.images, self.shards_dir = source, shards
        sizes = [kwargs.get(k) or 0 for k in ("image_size", "val_image_size", "resize_size")]
        if options.get("max_side") and max(sizes) > options["max_side"]:
            log.warning(
                "data.ingest.max_side=%s is below the training size (%s px): the stored images will be enlarged; "
                "raise data.ingest.max_side",
                options["max_side"],
                max(sizes),
            )
