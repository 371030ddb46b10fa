"""The streaming webdataset pipeline, as an explicit list of stages.

    shard list -> seeded per-epoch shard shuffle -> split by rank -> split by worker
      -> tar to samples (webdataset) -> sample shuffle buffer -> decode -> caption -> filters
      -> image transform -> batch + collate (+ optional tokenization) -> {image, caption, key, ...}

Two epoch modes:

- ``exact``: every sample of the shard list exactly once per epoch across all ranks and workers.
  The shard order is shuffled with a seed that depends only on ``(seed, epoch)``, so every rank
  computes the same permutation, and then rank ``r`` of ``R`` takes shards ``r::R`` and worker ``w``
  of ``W`` of those takes ``w::W``. (Shuffling before the split, rather than after, lets a shard move
  between ranks from one epoch to the next; it is still a partition.)
- ``resampled``: shards are drawn with replacement, forever, and an epoch is cut at a fixed length
  (``epoch_length`` samples across all ranks). Use it for multi-node runs where shards do not
  divide evenly among ranks; several sources are mixed with their weights.

Aspect-ratio buckets (``buckets``, see :mod:`trainer.data.buckets`; None keeps the square crops): each worker
assigns every sample to the bucket of its image's aspect ratio from the image header alone (no decoding) and keeps
a small buffer of raw samples per bucket; a bucket that reaches ``batch_size`` samples is decoded, each image
scaled to cover the bucket's size and cropped only where the ratio differs, and emitted as one batch (every image
of a batch has the bucket's (H, W); the batch carries ``"bucket": (width, height)``). Nothing waits for a pass
over the data: a buffer holds at most ``batch_size - 1`` samples. At the end of a worker's stream the partial
batches left in the buffers are emitted too, oldest first, so that an exact-mode epoch still yields every sample
exactly once; ``buckets.drop_partial`` (or ``drop_last``) drops them instead. Under DDP the ranks' batches of one
step may come from different buckets: each rank runs its own shapes and DDP averages the gradients, which have
the same shapes on every rank, so that is fine (a rank's batch may also be smaller than the others' at the end
of an epoch, as without buckets). Cached latents (``latents.npy``) are grouped by their shape instead.

A fault does not stop the run: a broken image, a missing caption or image, a caption that is not UTF-8,
an image above ``max_image_pixels`` (judged from its header, after JPEG draft-mode reduction, before decoding),
bad json, a truncated or unreadable tar is skipped, counted in :class:`FaultCounter` and logged with its shard
URL and key. Each batch carries its worker's cumulative counts under ``"data_stats"`` so the training side can
add them up across workers and ranks and log them as metrics.

Data that yields nothing does stop the run, with a :class:`~trainer.errors.DataError` naming what was skipped
and why, raised by :class:`ShardLoader` in the main process (a loader worker's exception would reach the user
wrapped in a traceback):

- an epoch of a rank that yields no batch (every shard empty or unreadable, every sample skipped; every sample
  filtered out too where the loader's ``allow_filtered_out`` is False, as the data module's loaders have it);
- a skipped fraction above ``max_skipped_fraction`` (0.9 by default; None: no limit) of the raw samples a rank
  has read in the epoch, judged on every batch once ``judge_after`` samples are read, and at the end of the
  epoch whatever the count. Only faults count: samples that ``filters`` reject are deliberate, and shard errors
  (counted per shard, not per sample) are reported but not counted;
- a worker that keeps none of the first ``give_up_after`` samples it reads: in resampled mode, whatever the
  reason (its stream would never end); in exact mode, when the faults among them are above the fraction.

For that each worker's stream, as :class:`ShardLoader` iterates it, ends with an item that holds only its final
``data_stats`` (which :class:`ShardLoader` takes out); at the end of a stream it changes nothing of the order
in which the DataLoader hands out the workers' batches, so exact resume is unaffected. A worker that gives up
ends its stream early with such an item, naming why.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from trainer.data.buckets import Buckets, Size
from trainer.data.sources import Source, check_sources, open_url, resolve_sources
from trainer.data.transforms import (
    MAX_IMAGE_PIXELS,
    ImageTooLarge,
    ImageTransform,
    decode_image,
    open_image,
    prepare_decode,
)
from trainer.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MODES = ("exact", "resampled")
# Skip reasons; "filtered" (rejected by a metadata filter) is counted but is no fault.
FAULTS = (
    "broken_image",
    "missing_image",
    "missing_caption",
    "bad_caption",
    "too_large",
    "bad_json",
    "bad_cache",
    "shard_error",
)
# The reasons counted per sample (a shard error is counted once per shard), which max_skipped_fraction judges
SAMPLE_FAULTS = tuple(reason for reason in FAULTS if reason != "shard_error")
# The key of the item that closes each worker's stream under ShardLoader: {STATS_ONLY: True, "data_stats": ...}
STATS_ONLY = "stats_only"
# What each reason most likely means, for the error of data that yields nothing ({opt}: the option prefix)
HINTS = {
    "missing_caption": "check {opt}.caption_key ({caption_key!r}; txt reads <key>.txt, json:<field> a field of "
    "<key>.json) or set {opt}.require_caption=false",
    "missing_image": "each sample needs an image member (.jpg, .jpeg, .png or .webp) beside its caption",
    "broken_image": "the images cannot be decoded (python tools/inspect_shards.py URLS lists them)",
    "bad_caption": "the .txt captions are not UTF-8: write them as UTF-8",
    "too_large": "the images are above {opt}.max_image_pixels={max_image_pixels}: raise it (null: no limit) or "
    "shrink the images (tools/make_shards.py --max-side)",
    "bad_json": "the samples' .json members are not JSON objects",
    "bad_cache": "the cached latents cannot be read: write the cache again (tools/cache_latents.py)",
    "filtered": "{opt}.filters reject every sample: loosen them",
    "shard_error": "the shards cannot be read: check {name}.urls",
}


class FaultCounter:
    """Counts skipped samples by reason and logs them (the first few of each reason, then every 1000th)."""

    def __init__(self, where: str = "", log_first: int = 5):
        self.counts: Counter[str] = Counter()
        self.shards = 0  # shards opened
        self.where = where
        self._shard: str | None = None
        self._shard_failed = False
        self.log_first = log_first

    def skip(self, reason: str, url: Any = None, key: Any = None, error: BaseException | None = None) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if reason != "filtered" and (n <= self.log_first or n % 1000 == 0):
            detail = f": {type(error).__name__}: {error}" if error is not None else ""
            log.warning("skipped sample (%s #%d)%s shard=%s key=%s%s", reason, n, self.where, url, key, detail)

    def start_shard(self, url: str) -> None:
        self._shard, self._shard_failed = url, False
        self.shards += 1

    def shard_error(self, error: BaseException) -> bool:
        """A webdataset exception handler: count and log once per shard, then go on with the next shard.

        (A truncated tar raises twice, once for the cut member and once for the stream.)"""
        if not self._shard_failed:
            self._shard_failed = True
            self.skip("shard_error", self._shard, None, error)
        return True


@dataclass
class SampleFilter:
    """Metadata filters; sizes come from the sample's json (``width``/``height``) or else the image."""

    min_width: int = 0
    min_height: int = 0
    min_aspect: float | None = None  # width / height
    max_aspect: float | None = None
    min_caption_length: int = 0  # characters
    max_caption_length: int | None = None

    def accepts_caption(self, caption: str) -> bool:
        n = len(caption)
        return n >= self.min_caption_length and (self.max_caption_length is None or n <= self.max_caption_length)

    def accepts_size(self, width: int, height: int) -> bool:
        if width < self.min_width or height < self.min_height:
            return False
        aspect = width / max(height, 1)
        if self.min_aspect is not None and aspect < self.min_aspect:
            return False
        return not (self.max_aspect is not None and aspect > self.max_aspect)


class _GiveUp(Exception):  # noqa: N818 - not an error of its own: it ends a worker's stream
    """A worker's stream ends early: it cannot yield anything (the message says why)."""


@dataclass
class _Progress:
    """Where a worker's stream stands: raw samples read, batches made, samples kept (this run)."""

    position: int = 0
    produced: int = 0
    kept: int = 0


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _reasons(counts: dict[str, int]) -> str:
    """``missing_caption 40, broken_image 2``: the reasons counted, most frequent first."""
    named = sorted(((n, reason) for reason, n in counts.items() if n), key=lambda item: (-item[0], item[1]))
    return ", ".join(f"{reason} {n}" for n, reason in named)


def _seeded(*parts: Any) -> random.Random:
    return random.Random(":".join(str(p) for p in parts))


class ShardDataset(IterableDataset):
    """An iterable of collated batches streamed from webdataset shards; see the module docstring.

    ``rank`` and ``world_size`` are given explicitly (the data module reads them from the trainer),
    so the same object works in one process, under DDP, and in tests that play several ranks.
    ``num_workers`` is what the loader will use; it is checked against the shard count up front.
    ``max_skipped_fraction`` and ``max_image_pixels`` are described in the module docstring.
    """

    # Raw samples a rank reads in an epoch before its skipped fraction is judged (it is at the epoch's end too)
    judge_after = 1000
    # Raw samples a worker reads without keeping one before it gives up (module docstring)
    give_up_after = 5000

    def __init__(
        self,
        urls: Any,
        *,
        batch_size: int,
        mode: str = "exact",
        epoch_length: int | None = None,
        transform: ImageTransform | None = None,
        caption_key: str = "txt",
        require_caption: bool = True,
        filters: SampleFilter | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        name: str = "data",
        buckets: Buckets | Any = None,
        caption_transform: Callable[[str, dict, random.Random], str] | None = None,
        max_skipped_fraction: float | None = 0.9,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ):
        super().__init__()
        option = name.split(".")[0]  # "data" of "data.train": where the data options live in the config
        if max_skipped_fraction is not None and (
            isinstance(max_skipped_fraction, bool)
            or not isinstance(max_skipped_fraction, (int, float))
            or not 0 <= max_skipped_fraction <= 1
        ):
            raise ConfigError(
                f"{option}.max_skipped_fraction must be a number from 0 to 1 (e.g. 0.9) or null (no limit), "
                f"got {max_skipped_fraction!r}"
            )
        if max_image_pixels is not None and (
            isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1
        ):
            raise ConfigError(
                f"{option}.max_image_pixels must be a positive number of pixels (e.g. {MAX_IMAGE_PIXELS}) or null "
                f"(no limit), got {max_image_pixels!r}"
            )
        self.option = option
        self.max_skipped_fraction, self.max_image_pixels = max_skipped_fraction, max_image_pixels
        if mode not in MODES:
            raise ConfigError(f"{name}.mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1:
            raise ConfigError(f"{name}.batch_size must be at least 1, got {batch_size}")
        if not (caption_key == "txt" or caption_key.startswith("json:")):
            raise ConfigError(f"{name}.caption_key must be 'txt' or 'json:<field>', got {caption_key!r}")
        self.sources: list[Source] = resolve_sources(urls)
        check_sources(self.sources, name)
        self.mode, self.batch_size, self.name = mode, batch_size, name
        self.transform = transform or ImageTransform()
        self.caption_key, self.require_caption = caption_key, require_caption
        self.filters, self.tokenizer = filters, tokenizer
        # (caption, json metadata, the sample's RNG) -> the caption to train on; e.g. shapes.AttributeCaptions
        self.caption_transform = caption_transform
        self.shuffle, self.shuffle_buffer, self.seed, self.drop_last = shuffle, shuffle_buffer, seed, drop_last
        self.rank, self.world_size = rank, world_size
        # None: square crops of ``transform.size``; else batches of one aspect-ratio bucket each (module docstring)
        self.buckets: Buckets | None = Buckets.from_config(buckets, f"{name}.buckets")
        self.epoch = 0
        # Set by ShardLoader when a run resumes mid-epoch: {logical worker: (raw samples read, batches made)}.
        self.resume: dict[int, tuple[int, int]] | None = None
        self.rotation = 0
        # Set by ShardLoader while it starts its workers: end each stream with a stats-only item (module docstring)
        self.stats_items = False
        workers = max(1, num_workers)
        if mode == "exact":
            if len({s.weight for s in self.sources}) > 1:
                raise ConfigError(
                    f"{name}: source weights only apply with mode=resampled; exact mode reads every shard once"
                )
            n = len(self.urls)
            if n < world_size * workers:
                raise ConfigError(
                    f"{name}: exact mode needs at least one shard per rank and worker, but there are {n} shards "
                    f"for {world_size} ranks x {workers} workers = {world_size * workers} readers (a rank "
                    f"without a shard would hang DDP). Write more, smaller shards (tools/make_shards.py "
                    f"--samples-per-shard), lower num_workers, or use mode=resampled with an epoch_length."
                )
            self.epoch_length = None
        else:
            if not epoch_length or epoch_length < 1:
                raise ConfigError(f"{name}: mode=resampled needs epoch_length (samples per epoch, all ranks together)")
            self.epoch_length = epoch_length
            if self.batches_per_rank < 1:
                raise ConfigError(
                    f"{name}: epoch_length={epoch_length} is less than one batch per rank "
                    f"({world_size} ranks x batch_size {batch_size})"
                )

    @property
    def urls(self) -> list[str]:
        return [url for source in self.sources for url in source.urls]

    @property
    def batches_per_rank(self) -> int:
        if self.epoch_length is None:
            raise TypeError("the length of an exact-mode epoch is not known before reading it")
        return self.epoch_length // (self.world_size * self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards_for(self, worker: int, num_workers: int, epoch: int | None = None) -> list[str]:
        """Exact mode: the shards that ``worker`` of this rank reads in ``epoch``."""
        shards = list(self.urls)
        if self.shuffle:
            _seeded(self.seed, epoch if epoch is not None else self.epoch).shuffle(shards)
        return shards[self.rank :: self.world_size][worker::num_workers]

    # -- the errors of data that yields nothing (raised by ShardLoader) ------------------------------------------

    def nothing_message(
        self, epoch: int, counts: dict[str, int], read: int, shards: int, kept: int, why: str | None = None
    ) -> str:
        """One line for an epoch of this rank without a batch: ``read`` raw samples in ``shards`` shards, of which
        ``kept`` passed, skipped as ``counts`` say; ``why``: what a worker that gave up said."""
        where = f"{self.name}: epoch {epoch} of rank {self.rank}"
        how = f" ({why})" if why else ""
        unreadable = counts.get("shard_error", 0)
        in_shards = _plural(shards, "shard") + (f" ({unreadable} unreadable)" if unreadable else "")
        if read == 0:
            return (
                f"{where} yielded no sample{how}: its {in_shards} held none; check {self.name}.urls "
                "(python tools/inspect_shards.py URLS shows what a shard holds)"
            )
        skipped = sum(counts.get(reason, 0) for reason in (*SAMPLE_FAULTS, "filtered"))
        reasons = f" ({_reasons(counts)})" if skipped or unreadable else ""
        if kept > 0 and why is None:
            return (
                f"{where} yielded no batch: {kept} samples passed of {read} read in {in_shards}{reasons}, fewer "
                f"than one batch of {self.batch_size} in each loader worker, and partial batches are dropped; lower "
                f"the batch size ({self.option}.batch_size) or write more samples"
            )
        return f"{where} yielded no sample{how}: {skipped} of {read} samples skipped{reasons} in {in_shards}; " + (
            self._hint(counts)
        )

    def fraction_message(self, epoch: int, counts: dict[str, int], read: int) -> str:
        faults = {reason: counts.get(reason, 0) for reason in SAMPLE_FAULTS}
        fraction = sum(faults.values()) / read
        percent = f"{math.floor(round(fraction * 1000, 6)) / 10:g}%"
        return (
            f"{self.name}: {percent} of {read} samples read by rank {self.rank} in epoch {epoch} were skipped "
            f"({_reasons(faults)}), above {self.option}.max_skipped_fraction={self.max_skipped_fraction}; "
            f"{self._hint(faults)}, or raise {self.option}.max_skipped_fraction (null: no limit)"
        )

    def _hint(self, counts: dict[str, int]) -> str:
        reason = max(HINTS, key=lambda r: counts.get(r, 0))
        return HINTS[reason].format(
            opt=self.option, name=self.name, caption_key=self.caption_key, max_image_pixels=self.max_image_pixels
        )

    # -- stages ---------------------------------------------------------------------------------

    def read_samples(self, urls: Iterator[str], faults: FaultCounter) -> Iterator[dict]:
        """Tar shards to raw samples (dicts of member bytes), with shard errors counted and skipped."""

        def streams():
            for url in urls:
                faults.start_shard(url)
                try:
                    stream = open_url(url)
                except Exception as error:  # noqa: BLE001 - any unreadable shard is skipped
                    error.args = (*error.args, url)
                    faults.shard_error(error)
                    continue
                try:
                    yield {"url": url, "stream": stream}
                finally:  # the reader has moved on to the next shard (or stopped)
                    stream.close()

        files = wds.tariterators.tar_file_expander(streams(), handler=faults.shard_error)
        return wds.tariterators.group_by_keys(files, handler=faults.shard_error)

    def _resampled(self, rng: random.Random, faults: FaultCounter) -> Iterator[dict]:
        def endless(source: Source) -> Iterator[dict]:
            empty = 0
            while True:
                got = False
                for sample in self.read_samples(iter([rng.choice(source.urls)]), faults):
                    got = True
                    yield sample
                empty = 0 if got else empty + 1
                if empty > max(50, 5 * len(source.urls)):
                    raise _GiveUp(f"drew {empty} shards in a row from {source.name!r} without a sample in them")

        streams = [endless(source) for source in self.sources]
        weights = [source.weight for source in self.sources]
        indices = range(len(streams))
        while True:
            yield next(streams[rng.choices(indices, weights)[0]])

    def _caption(self, sample: dict, meta: dict) -> str | None:
        """The sample's caption, stripped, or None; a ``.txt`` that is not UTF-8 raises UnicodeDecodeError."""
        if self.caption_key == "txt":
            raw = sample.get("txt")
            caption = raw.decode("utf-8") if raw is not None else None
        else:
            value = meta.get(self.caption_key[5:])
            caption = str(value) if value is not None else None
        return caption.strip() if caption is not None else None

    def _parse(self, sample: dict, faults: FaultCounter) -> tuple[str, dict, str] | None:
        """The checks of an image sample that need no decoding: (image extension, json metadata, caption), or None
        when it is skipped (counted in ``faults``). Sizes are checked against the filters here when the json has
        them."""
        url, key = sample.get("__url__"), sample.get("__key__")
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            return faults.skip("missing_image", url, key)
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            if not isinstance(meta, dict):
                raise ValueError("the json member is not an object")
        except ValueError as error:
            return faults.skip("bad_json", url, key, error)
        try:
            caption = self._caption(sample, meta)
        except UnicodeDecodeError as error:
            if self.require_caption:
                return faults.skip("bad_caption", url, key, error)
            caption = ""  # a stage that needs no captions (the autoencoder) keeps the image
        if not caption:
            if self.require_caption:
                return faults.skip("missing_caption", url, key)
            caption = ""
        if self.filters is not None:
            width, height = meta.get("width"), meta.get("height")
            if not self.filters.accepts_caption(caption) or (
                isinstance(width, int) and isinstance(height, int) and not self.filters.accepts_size(width, height)
            ):
                return faults.skip("filtered", url, key)
        return ext, meta, caption

    def decode_sample(
        self, sample: dict, rng: random.Random, faults: FaultCounter, size: Size | None = None
    ) -> dict | None:
        """One raw sample -> {image (3, H, W), caption, key, url, meta}, or None when it is skipped. With ``size``
        (a bucket's (width, height), whose size filter :meth:`_bucket_of` already applied) the image is fitted to
        that size; else it is resized and cropped square by ``transform``."""
        url, key = sample.get("__url__"), sample.get("__key__")
        if "latents.npy" in sample:  # a cached sample (tools/cache_latents.py): tensors instead of an image
            return self._decode_cached(sample, faults, rng)
        parsed = self._parse(sample, faults)
        if parsed is None:
            return None
        ext, meta, caption = parsed
        try:
            if size is None:
                min_side = self.transform.resize_size or self.transform.size
                image = decode_image(sample[ext], min_side=min_side, max_pixels=self.max_image_pixels)
            else:
                image = decode_image(sample[ext], cover=size, max_pixels=self.max_image_pixels)
        except ImageTooLarge as error:  # judged from the header: nothing was decoded
            return faults.skip("too_large", url, key, error)
        except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for broken files
            return faults.skip("broken_image", url, key, error)
        if size is not None:
            pixels = self.transform.fit(image, size, rng)
        else:
            sized_by_meta = "width" in meta and "height" in meta
            if self.filters is not None and not sized_by_meta and not self.filters.accepts_size(*image.size):
                return faults.skip("filtered", url, key)
            pixels = self.transform(image, rng)
        if self.caption_transform is not None:
            caption = self.caption_transform(caption, meta, rng)
        return {"image": pixels, "caption": caption, "key": key, "url": url, "meta": meta}

    def _bucket_of(self, sample: dict, faults: FaultCounter) -> tuple | None:
        """Which buffer a raw sample joins, without decoding it: ``("image", bucket index)`` by the aspect ratio
        in the image's header, or ``("latents", shape)`` for a cached sample; None when it is skipped."""
        url, key = sample.get("__url__"), sample.get("__key__")
        if "latents.npy" in sample:
            try:
                return ("latents", tuple(np.load(io.BytesIO(sample["latents.npy"])).shape))
            except (ValueError, OSError) as error:
                return faults.skip("bad_cache", url, key, error)
        parsed = self._parse(sample, faults)
        if parsed is None:
            return None
        ext, meta, _ = parsed
        try:
            with open_image(sample[ext]) as image:  # reads the header only
                width, height = image.size
                if self.max_image_pixels is not None:  # as decode_image will see it, JPEGs in draft mode
                    prepare_decode(image, cover=self.buckets.size_for(width, height), max_pixels=self.max_image_pixels)
        except ImageTooLarge as error:
            return faults.skip("too_large", url, key, error)
        except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for broken files
            return faults.skip("broken_image", url, key, error)
        sized_by_meta = "width" in meta and "height" in meta
        if self.filters is not None and not sized_by_meta and not self.filters.accepts_size(width, height):
            return faults.skip("filtered", url, key)
        return ("image", self.buckets.assign(width, height))

    def _decode_cached(self, sample: dict, faults: FaultCounter, rng: random.Random) -> dict | None:
        url, key = sample.get("__url__"), sample.get("__key__")
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
            item = {"latents": torch.from_numpy(np.load(io.BytesIO(sample["latents.npy"])))}
            if "context.npy" in sample:
                item["context"] = torch.from_numpy(np.load(io.BytesIO(sample["context.npy"])))
        except (ValueError, OSError) as error:
            return faults.skip("bad_cache", url, key, error)
        try:
            caption = self._caption(sample, meta) or ""
        except UnicodeDecodeError as error:
            return faults.skip("bad_caption", url, key, error)
        if self.caption_transform is not None:  # for captions encoded live; cached embeddings cannot follow
            caption = self.caption_transform(caption, meta, rng)  # (the LDM task refuses the two together)
        return {**item, "caption": caption, "key": key, "url": url, "meta": meta}

    # What a batch holds beside its tensors: strings, numbers and the samples' json, none of it a tensor
    HOST_ONLY = frozenset({"caption", "key", "url", "meta", "data_stats"})

    def _collate(self, samples: list[dict], stats: dict) -> dict:
        batch = {
            # default_collate stacks straight into shared memory inside a loader worker, which saves
            # the DataLoader a second copy of every batch on its way to the main process
            **{
                name: default_collate([s[name] for s in samples])
                for name in ("image", "latents", "context")
                if name in samples[0]
            },
            "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples],
            "url": [s["url"] for s in samples],
            "meta": [s["meta"] for s in samples],
            "data_stats": stats,
        }
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer(batch["caption"])
        return batch

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # On a resume the loader rotates the workers so that the DataLoader's round robin (physical worker 0 first)
        # hands out the batches in the order of the interrupted run; every stream below is named by the logical id.
        worker = (physical + self.rotation) % num_workers
        start = (self.resume or {}).get(worker, (0, 0))
        return self._batches(worker, num_workers, self.epoch, *start, stats_items=self.stats_items)

    def _batches(
        self, worker: int, num_workers: int, epoch: int, skip: int, produced: int, stats_items: bool = False
    ) -> Iterator[dict]:
        """The batches of one logical worker in one epoch, after its first ``skip`` raw samples (the shuffled
        stream's order) and ``produced`` batches: a resumed worker replays its stream up to there without decoding.
        With ``stats_items`` the stream ends with a stats-only item (module docstring); without, a worker that
        gives up raises DataError itself."""
        rng = _seeded(self.seed, epoch, self.rank, worker)  # shard draws and the shuffle buffer
        faults = FaultCounter(where=f" [{self.name} rank {self.rank} worker {worker}]")
        if self.mode == "exact":
            samples = self.read_samples(iter(self.shards_for(worker, num_workers, epoch)), faults)
            max_batches = None
        else:
            samples = self._resampled(rng, faults)
            per_rank = self.batches_per_rank
            max_batches = per_rank // num_workers + (worker < per_rank % num_workers)
        if self.shuffle and self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(samples)
        progress = _Progress(produced=produced)
        failed = None
        try:
            if self.buckets is not None:
                yield from self._bucketed(samples, worker, epoch, produced, max_batches, faults, progress)
            else:
                yield from self._plain(samples, worker, epoch, skip, max_batches, faults, progress)
        except _GiveUp as error:
            failed = f"worker {worker} {error}"
            if not stats_items:
                read = progress.position - (skip if self.buckets is None else 0)
                raise DataError(self.nothing_message(epoch, faults.counts, read, faults.shards, 0, failed)) from None
        if stats_items:
            stats = self._stats(worker, faults, epoch, progress.position, progress.produced)
            yield {STATS_ONLY: True, "data_stats": {**stats, "shards": faults.shards, "failed": failed}}

    def _plain(
        self,
        samples: Iterator[dict],
        worker: int,
        epoch: int,
        skip: int,
        max_batches: int | None,
        faults: FaultCounter,
        progress: _Progress,
    ) -> Iterator[dict]:
        """Batches of ``batch_size`` consecutive samples, each resized and cropped square by ``transform``."""
        batch = []
        for sample in samples:
            if max_batches is not None and progress.produced >= max_batches:
                break
            progress.position += 1
            position = progress.position
            if position <= skip:
                continue
            # Augmentations draw from a generator of their own per sample, so a replay need not run them.
            item = self.decode_sample(sample, _seeded(self.seed, epoch, self.rank, worker, position), faults)
            if item is None:
                if not progress.kept:
                    self._check_stall(position - skip, faults)
                continue
            progress.kept += 1
            batch.append(item)
            if len(batch) == self.batch_size:
                progress.produced += 1
                yield self._collate(batch, self._stats(worker, faults, epoch, position, progress.produced))
                batch = []
        if batch and not self.drop_last and (max_batches is None or progress.produced < max_batches):
            progress.produced += 1
            yield self._collate(batch, self._stats(worker, faults, epoch, progress.position, progress.produced))

    def _check_stall(self, read: int, faults: FaultCounter) -> None:
        """Raise _GiveUp for a worker that has read ``read`` samples of its stream and kept none (module docstring);
        judged every ``give_up_after`` samples."""
        if read % self.give_up_after:
            return
        if self.mode == "resampled":
            raise _GiveUp(f"kept none of the {read} samples it read (its stream would never end)")
        threshold = self.max_skipped_fraction
        skipped = sum(faults.counts[reason] for reason in SAMPLE_FAULTS)
        if threshold is not None and skipped > threshold * read:
            raise _GiveUp(f"kept none of the first {read} samples it read")

    def _bucketed(
        self,
        samples: Iterator[dict],
        worker: int,
        epoch: int,
        done: int,
        max_batches: int | None,
        faults: FaultCounter,
        progress: _Progress,
    ) -> Iterator[dict]:
        """Batches formed within buckets while streaming (see the module docstring), after the first ``done``.

        The batches are a function of the sample stream alone (bucket membership comes from image headers), so a
        resumed worker forms its first ``done`` batches again from the replayed stream without decoding them, and
        its buffers then hold exactly the samples that the interrupted run's buffers held."""
        pending: dict[tuple, list[tuple[int, dict]]] = {}  # buffer key -> [(stream position, raw sample)], oldest first
        progress.produced = 0  # batches made, those before the resume included

        def emit(where: tuple, group: list[tuple[int, dict]]) -> dict | None:
            progress.produced += 1
            if progress.produced <= done:  # consumed before the resume
                return None
            size = self.buckets.sizes[where[1]] if where[0] == "image" else None
            items = [
                self.decode_sample(sample, _seeded(self.seed, epoch, self.rank, worker, at), faults, size)
                for at, sample in group
            ]
            items = [item for item in items if item is not None]  # an image may still fail to decode
            if not items:
                return None
            batch = self._collate(items, self._stats(worker, faults, epoch, progress.position, progress.produced))
            if size is not None:
                batch["bucket"] = size
            return batch

        for sample in samples:
            if max_batches is not None and progress.produced >= max_batches:
                break
            progress.position += 1
            where = self._bucket_of(sample, faults)
            if where is None:
                if not progress.kept:  # a replay parses every sample again, so it counts them all
                    self._check_stall(progress.position, faults)
                continue
            progress.kept += 1
            group = pending.setdefault(where, [])
            group.append((progress.position, sample))
            if len(group) == self.batch_size:
                del pending[where]
                batch = emit(where, group)
                if batch is not None:
                    yield batch
        if self.drop_last or self.buckets.drop_partial:
            return
        for where, group in pending.items():  # the end of the stream: the partial batches, oldest first
            if max_batches is not None and progress.produced >= max_batches:
                break
            batch = emit(where, group)
            if batch is not None:
                yield batch

    def _stats(self, worker: int, faults: FaultCounter, epoch: int, position: int, produced: int) -> dict:
        return {
            "rank": self.rank,
            "worker": worker,
            "epoch": epoch,
            "counts": dict(faults.counts),
            # where this worker's stream stands once this batch is consumed: raw samples read, batches made
            "position": (position, produced),
        }


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`ShardDataset` that advances the dataset's epoch on every ``iter()``
    and can resume in the middle of an epoch exactly where an interrupted run stopped.

    Each new iteration (one per training epoch) starts fresh workers with the next epoch number, so
    the shard order and shuffles change per epoch while staying reproducible from the seed.

    With ``even_ranks`` (for training under torch.distributed), every rank stops as soon as any rank
    runs out of batches: shards seldom hold the same number of samples, and a rank that stopped early
    would leave the others waiting in their next gradient all-reduce forever. The ranks agree through
    one small all-gather per batch on a CPU (gloo) group, which also tells every rank where the other
    ranks' streams stand; the unread tail of the longer ranks is left for the next epoch's differently
    shuffled pass.

    Exact resume (the ``state_dict`` / ``load_state_dict`` protocol, which Lightning calls when it
    writes and restores a checkpoint): the training side reports every batch it takes
    (:meth:`mark_consumed`, called by :class:`trainer.callbacks.resume.ExactResume`), so the state
    names consumed batches, not the ones Lightning and the workers have prefetched. It is the epoch,
    the number of batches consumed in it and, per rank and worker, the raw samples read and batches
    made. A resumed worker replays its shard stream and shuffle buffer up to there without decoding
    (tar reading only; with buckets also the image headers, which fills the bucket buffers again),
    and the workers are rotated so that batches come in the interrupted run's order. The same
    number of ranks and workers is required; otherwise the run restarts its epoch.

    Data that yields nothing (see the module docstring) stops the iteration with DataError here, in the main
    process: each worker's stream ends with a stats-only item, which this loader takes out (it never reaches the
    caller), and every batch's ``data_stats`` keeps the epoch's tallies per worker. An epoch emptied by ``filters``
    alone, with no fault, ends empty with a warning instead, unless ``allow_filtered_out`` is False (the data
    module's loaders: a training run would otherwise go through empty epochs forever).
    """

    def __init__(
        self,
        dataset: ShardDataset,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        even_ranks: bool = False,
        allow_filtered_out: bool = True,
    ):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=False,
            # Its own generator for the workers' base seed: iter() must not draw from the global RNG, whose
            # state a resumed run restores and an uninterrupted one does not touch at that point.
            generator=torch.Generator().manual_seed(dataset.seed),
        )
        self.next_epoch = 0
        self.even_ranks = even_ranks
        self.allow_filtered_out = allow_filtered_out
        self.consumed = 0  # batches of the current epoch that training has taken
        self.positions: dict[int, dict[int, tuple[int, int]]] = {}  # rank -> logical worker -> (raw, batches)
        self.last_workers: dict[int, int] = {}  # rank -> the logical worker of the last batch consumed
        self._resume: dict[str, Any] | None = None

    def __iter__(self):
        dataset: ShardDataset = self.dataset
        workers = max(1, self.num_workers)
        state, self._resume = self._resume, None
        if state is not None:
            epoch, self.consumed = state["epoch"], state["consumed"]
            self.positions = {int(r): {int(w): tuple(p) for w, p in ws.items()} for r, ws in state["positions"].items()}
            self.last_workers = {int(r): int(w) for r, w in state.get("last_workers", {}).items()}
            # The DataLoader goes round the workers that still have batches: the next batch is the next such worker's
            # after the last one taken. (consumed % workers is the same while none has run out; older checkpoints.)
            last = self.last_workers.get(dataset.rank)
            rotation = (last + 1) % workers if last is not None else self.consumed % workers
            dataset.resume, dataset.rotation = self.positions.get(dataset.rank, {}), rotation
            log.info("data: resuming epoch %d after %d batches", epoch, self.consumed)
        else:
            epoch, self.consumed, self.positions, self.last_workers = self.next_epoch, 0, {}, {}
            dataset.resume, dataset.rotation = None, 0
        dataset.set_epoch(epoch)
        self.next_epoch = epoch + 1
        # the raw samples of each worker's stream that a resumed worker replays without counting their faults
        replayed = {w: p[0] for w, p in (dataset.resume or {}).items()} if dataset.buckets is None else {}
        dataset.stats_items = True
        items = super().__iter__()  # workers get their copy of the dataset (and its resume point) here
        dataset.resume, dataset.rotation, dataset.stats_items = None, 0, False
        batches = self._checked(items, epoch, replayed, resumed=self.consumed > 0)
        if self.even_ranks and _distributed_world_size() > 1:
            return _lockstep(batches, stop_together=dataset.mode == "exact", name=dataset.name)
        return batches

    def __len__(self) -> int:
        # DataLoader's own __len__ would also have its iterator warn once the items outnumber it, which with each
        # worker's closing stats item they do; the batches that training sees never do
        return len(self.dataset)

    def _checked(self, items: Iterator[dict], epoch: int, replayed: dict[int, int], resumed: bool) -> Iterator[dict]:
        """The batches of ``items`` without the workers' stats-only items, stopping with DataError when the epoch
        yields no batch (unless it was ``resumed`` after some), a worker gave up, or too much is skipped (module
        docstring)."""
        dataset: ShardDataset = self.dataset
        tallies: dict[int, tuple[dict[str, int], int]] = {}  # logical worker -> (counts, raw samples counted)
        shards: dict[int, int] = {}
        batches = 0

        def totals() -> tuple[dict[str, int], int]:
            counts: Counter[str] = Counter()
            for worker_counts, _ in tallies.values():
                counts.update(worker_counts)
            return dict(counts), sum(read for _, read in tallies.values())

        def kept(counts: dict[str, int], read: int) -> int:
            return read - sum(counts.get(reason, 0) for reason in (*SAMPLE_FAULTS, "filtered"))

        def nothing(why: str | None = None) -> DataError:
            counts, read = totals()
            return DataError(
                dataset.nothing_message(epoch, counts, read, sum(shards.values()), kept(counts, read), why)
            )

        def judge(final: bool) -> None:
            threshold = dataset.max_skipped_fraction
            if threshold is None:
                return
            counts, read = totals()
            if read <= 0 or (read < dataset.judge_after and not final):
                return  # too few samples yet to judge by
            if sum(counts.get(reason, 0) for reason in SAMPLE_FAULTS) > threshold * read:
                raise DataError(dataset.fraction_message(epoch, counts, read))

        for item in items:
            stats = item["data_stats"]
            worker = stats["worker"]
            tallies[worker] = (stats["counts"], stats["position"][0] - replayed.get(worker, 0))
            if item.get(STATS_ONLY):
                shards[worker] = stats["shards"]
                if stats["failed"]:
                    raise nothing(stats["failed"])
                judge(final=False)
                continue
            batches += 1
            judge(final=False)
            yield item
        if not batches and not resumed:  # (a resumed epoch may have had all its batches before the interruption)
            counts, read = totals()
            faults = sum(counts.get(reason, 0) for reason in FAULTS)
            if self.allow_filtered_out and counts.get("filtered") and not faults and kept(counts, read) <= 0:
                log.warning("%s", nothing().args[0])  # deliberate; a training run would say so and stop
                return
            raise nothing()
        judge(final=True)

    def mark_consumed(self, batch: Any) -> None:
        """Training took ``batch``: record where the streams stand after it."""
        stats = batch.get("data_stats") if isinstance(batch, dict) else None
        if stats is None:
            return
        self.consumed += 1
        for rank, worker, raw, produced in stats.get("ranks") or [(stats["rank"], stats["worker"], *stats["position"])]:
            self.positions.setdefault(int(rank), {})[int(worker)] = (int(raw), int(produced))
            self.last_workers[int(rank)] = int(worker)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.next_epoch - 1,
            "consumed": self.consumed,
            "positions": {r: dict(ws) for r, ws in self.positions.items()},
            "last_workers": dict(self.last_workers),
            "num_workers": max(1, self.num_workers),
            "world_size": self.dataset.world_size,
            "mode": self.dataset.mode,
            "seed": self.dataset.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        here = {"num_workers": max(1, self.num_workers), "world_size": self.dataset.world_size}
        here.update(mode=self.dataset.mode, seed=self.dataset.seed)
        differs = {key: (state.get(key), value) for key, value in here.items() if state.get(key) != value}
        if state["epoch"] < 0:
            return
        if differs:
            changes = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differs.items())
            log.warning(
                "data: the checkpoint's data position cannot be restored exactly (%s); epoch %d starts over",
                changes,
                state["epoch"],
            )
            self.next_epoch = state["epoch"]
            return
        self._resume = state


def _distributed_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_GLOO_GROUP = None


def _lockstep(batches: Iterator[dict], stop_together: bool, name: str = "data") -> Iterator[dict]:
    """Batches of this rank, each carrying every rank's stream position for the same batch index under
    ``data_stats["ranks"]``; with ``stop_together``, the epoch ends on all ranks when any rank runs out. A rank
    whose data stops with DataError raises it, and every other rank then raises one naming that rank, at the same
    batch index: none is left waiting in a collective."""
    import torch.distributed as dist

    global _GLOO_GROUP
    if _GLOO_GROUP is None:  # a collective: every rank reaches its first iter() at the same point
        # a group of its own, so these calls never interleave with the gradient all-reduces
        _GLOO_GROUP = dist.new_group(backend="gloo")
    world = dist.get_world_size()
    while True:
        failure = None
        try:
            batch = next(batches, None)
        except DataError as error:
            batch, failure = None, error
        if failure is not None:
            mine = torch.tensor([-1, dist.get_rank(), -1, -1, -1], dtype=torch.int64)
        elif batch is None:
            mine = torch.tensor([0, -1, -1, -1, -1], dtype=torch.int64)
        else:
            stats = batch["data_stats"]
            mine = torch.tensor([1, stats["rank"], stats["worker"], *stats["position"]], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine, group=_GLOO_GROUP)
        if failure is not None:
            raise failure
        failed = [int(row[1]) for row in gathered if row[0] < 0]
        if failed:
            raise DataError(
                f"{name}: rank {failed[0]} stopped the epoch: its data yields no sample or too much of it is "
                "skipped (that rank's own error says why)"
            )
        have = [bool(row[0]) for row in gathered]
        if batch is None or (stop_together and not all(have)):
            if batch is not None:
                log.info("epoch ends on all ranks: another rank has run out of batches")
            if stop_together or not any(have):
                return
            continue  # resampled mode: ranks make equal batch counts, so this is only the last round
        batch["data_stats"]["ranks"] = [row[1:].tolist() for row in gathered if row[0]]
        yield batch


class DataStats:
    """Adds up the per-worker cumulative fault counts that batches carry (``batch["data_stats"]``)."""

    def __init__(self) -> None:
        self._latest: dict[tuple[int, int, int], dict[str, int]] = {}

    def update(self, stats: dict) -> None:
        self._latest[(stats["epoch"], stats["rank"], stats["worker"])] = stats["counts"]

    def totals(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for counts in self._latest.values():
            total.update(counts)
        return {reason: total.get(reason, 0) for reason in (*FAULTS, "filtered")}
