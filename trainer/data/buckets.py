"""Aspect-ratio buckets: train on whole pictures at their own shape instead of square crops of them.

A bucket is an image size (width, height). A set of buckets covers a range of aspect ratios at about the same
pixel count, so every batch costs about the same whatever its shape; each side is a multiple of ``step`` (for the
latent diffusion stage: the autoencoder's downsampling times the UNet's, so that the latents fit the UNet).

- :func:`generate_buckets` makes such a set from a pixel budget (``max_area``) and ``step``, limited by
  ``max_aspect`` and / or ``min_side`` and ``max_side``; or :class:`Buckets` takes an explicit list.
- :meth:`Buckets.assign` puts an image (width, height) in the bucket of the nearest aspect ratio (in log-ratio).
- :func:`resize_and_crop` scales an image uniformly until it covers its bucket and crops the rest: only what the
  ratio mismatch requires, centered (or at a random offset, for training). Nothing is stretched.

The streaming side (a small buffer per bucket in each loader worker) lives in :mod:`trainer.data.pipeline`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

from trainer.errors import ConfigError

Size = tuple[int, int]  # (width, height) in pixels, as PIL writes sizes

OPTIONS = ("max_area", "step", "min_side", "max_side", "max_aspect", "sizes", "drop_partial")


def generate_buckets(
    max_area: int,
    step: int = 64,
    *,
    min_side: int | None = None,
    max_side: int | None = None,
    max_aspect: float | None = 2.0,
) -> list[Size]:
    """Bucket sizes of about ``max_area`` pixels each (never more), sides multiples of ``step``, sorted by aspect.

    For every shorter side ``s`` (a multiple of ``step`` from ``min_side``, default ``step``, while ``s * s`` fits
    in ``max_area``) the longer side is the largest multiple of ``step`` that keeps the area within ``max_area``;
    each size is taken in both orientations. The area of every bucket is therefore at least
    ``max_area - step * sqrt(max_area)`` (within 12.5% for 512 * 512 at step 64). Sizes whose aspect ratio
    (longer / shorter side) is above ``max_aspect``, or whose longer side is above ``max_side``, are left out.
    """
    short = math.ceil((min_side or step) / step) * step
    longest: dict[int, int] = {}  # longer side -> the largest shorter side that goes with it
    while short * short <= max_area:
        long = max_area // short // step * step
        within_side = max_side is None or long <= max_side
        within_aspect = max_aspect is None or long <= max_aspect * short * (1 + 1e-9)
        if within_side and within_aspect:
            longest[long] = short
        short += step
    sizes = {size for long, short in longest.items() for size in ((long, short), (short, long))}
    return sorted(sizes, key=lambda size: (size[0] / size[1], size[0]))


def resize_and_crop(
    image: Image.Image,
    size: Size,
    *,
    crop: str = "center",
    rng: random.Random | None = None,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Scale ``image`` uniformly (aspect kept) to the smallest size that covers ``size`` (width, height), then crop
    to ``size``: along one axis only, the part that the aspect ratios' mismatch requires. ``crop="random"`` with an
    ``rng`` picks the offset at random, else the crop is centered."""
    target_w, target_h = size
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample, reducing_gap=None)
    spare_w, spare_h = new_w - target_w, new_h - target_h
    if crop == "random" and rng is not None:
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    if (spare_w, spare_h) != (0, 0):
        image = image.crop((left, top, left + target_w, top + target_h))
    return image


def covering_side(width: int, height: int, size: Size) -> int:
    """The shorter side an image of (width, height) has once scaled to cover ``size``: what a reduced-scale JPEG
    decode (:func:`trainer.data.transforms.decode_image`'s ``min_side``) may go down to."""
    scale = max(size[0] / width, size[1] / height)
    return max(1, math.ceil(min(width, height) * scale))


def require_multiple(width: int, height: int, multiple: int, what: str) -> None:
    """Raise a ConfigError (a ValueError) naming the offending side unless both are multiples of ``multiple``."""
    for name, value in (("width", width), ("height", height)):
        if value % multiple:
            raise ConfigError(
                f"{name} {value} is not a multiple of {multiple}: {what} must have sides that are multiples of "
                f"{multiple}, e.g. {max(multiple, value // multiple * multiple)} or {(value // multiple + 1) * multiple}"
            )


def require_size_multiple(size: int, multiple: int, key: str, what: str) -> None:
    """A ConfigError naming the config key unless the square image size ``size`` is a multiple of ``multiple``."""
    if size < multiple or size % multiple:
        low, high = max(multiple, size // multiple * multiple), (size // multiple + 1) * multiple
        raise ConfigError(
            f"{key}={size} is not a multiple of {multiple} ({what}): use {low}" + (f" or {high}" if high != low else "")
        )


@dataclass(frozen=True)
class Buckets:
    """A set of bucket sizes (width, height) and what to do with the partial batches at the end of a stream.

    ``drop_partial=False`` (the default) emits them, so that an exact-mode epoch yields every sample exactly once;
    ``True`` drops them (every batch is then full, at the cost of up to ``len(sizes) * (batch_size - 1)`` samples
    per loader worker and epoch)."""

    sizes: tuple[Size, ...]
    drop_partial: bool = False

    def __post_init__(self) -> None:
        sizes = tuple((int(w), int(h)) for w, h in self.sizes)
        object.__setattr__(self, "sizes", sizes)
        if not sizes:
            raise ConfigError("there are no buckets")
        ratios: dict[float, Size] = {}
        for size in sizes:
            ratio = round(math.log(size[0] / size[1]), 9)
            if ratio in ratios:
                raise ConfigError(
                    f"buckets {list(ratios[ratio])} and {list(size)} have the same aspect ratio; images go to the "
                    f"bucket of the nearest aspect ratio, so one of them would never be used"
                )
            ratios[ratio] = size
        object.__setattr__(self, "_log_ratios", tuple(math.log(w / h) for w, h in sizes))

    def assign(self, width: int, height: int) -> int:
        """The index of the bucket whose aspect ratio is nearest to width / height (in log-ratio; ties: the first)."""
        target = math.log(max(width, 1) / max(height, 1))
        ratios = self._log_ratios  # type: ignore[attr-defined]
        return min(range(len(ratios)), key=lambda i: abs(ratios[i] - target))

    def size_for(self, width: int, height: int) -> Size:
        return self.sizes[self.assign(width, height)]

    def __len__(self) -> int:
        return len(self.sizes)

    @classmethod
    def from_config(cls, spec: Mapping[str, Any] | None, name: str = "data.buckets") -> Buckets | None:
        """``None`` (no buckets: square crops), ``{max_area, step, max_aspect, min_side, max_side}`` (generated) or
        ``{sizes: [[width, height], ...], step}`` (explicit; ``step``, when given, checks the sides), each with an
        optional ``drop_partial``. Mistakes raise ConfigError naming the key."""
        if spec is None:
            return None
        if isinstance(spec, Buckets):
            return spec
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"{name} must be null or a mapping such as {{max_area: 262144, step: 64, max_aspect: 2.0}} or "
                f"{{sizes: [[512, 512], [576, 448]]}}; got {spec!r}"
            )
        unknown = sorted(set(spec) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"{name}.{unknown[0]} is not a bucket option; the options are {', '.join(OPTIONS)}")
        drop_partial = spec.get("drop_partial", False)
        if not isinstance(drop_partial, bool):
            raise ConfigError(f"{name}.drop_partial must be true or false, got {drop_partial!r}")
        step = spec.get("step")
        if step is not None:
            _positive_int(step, f"{name}.step")
        if (spec.get("sizes") is None) == (spec.get("max_area") is None):
            raise ConfigError(f"{name} needs either max_area (generated buckets) or sizes (a list), not both")
        if spec.get("sizes") is not None:
            extra = sorted(key for key in ("min_side", "max_side", "max_aspect") if spec.get(key) is not None)
            if extra:
                raise ConfigError(f"{name}.{extra[0]} applies to generated buckets (max_area), not to a sizes list")
            sizes = _sizes(spec["sizes"], f"{name}.sizes")
            if step is not None:
                for size in sizes:
                    if size[0] % step or size[1] % step:
                        raise ConfigError(
                            f"{name}.sizes: {list(size)} has a side that is not a multiple of step={step}"
                        )
            return cls(tuple(sizes), drop_partial)
        max_area = _positive_int(spec["max_area"], f"{name}.max_area")
        step = step if step is not None else 64
        min_side, max_side = spec.get("min_side"), spec.get("max_side")
        for key, value in (("min_side", min_side), ("max_side", max_side)):
            if value is not None:
                _positive_int(value, f"{name}.{key}")
        max_aspect = spec.get("max_aspect", 2.0)
        if max_aspect is not None and (isinstance(max_aspect, bool) or not isinstance(max_aspect, int | float)):
            raise ConfigError(f"{name}.max_aspect must be a number (longer / shorter side), got {max_aspect!r}")
        if max_aspect is not None and max_aspect < 1:
            raise ConfigError(f"{name}.max_aspect is longer side / shorter side, at least 1; got {max_aspect}")
        if step * step > max_area:
            raise ConfigError(f"{name}.max_area={max_area} is less than one step squared (step={step})")
        sizes = generate_buckets(max_area, step, min_side=min_side, max_side=max_side, max_aspect=max_aspect)
        if not sizes:
            raise ConfigError(
                f"{name}: no bucket of about {max_area} pixels with sides that are multiples of {step} fits "
                f"min_side={min_side}, max_side={max_side}, max_aspect={max_aspect}"
            )
        return cls(tuple(sizes), drop_partial)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _sizes(value: Any, key: str) -> list[Size]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigError(f"{key} must be a list of [width, height] pairs, got {value!r}")
    sizes = []
    for item in value:
        if isinstance(item, str) or not isinstance(item, Iterable) or len(pair := list(item)) != 2:
            raise ConfigError(f"{key} must be a list of [width, height] pairs; {item!r} is not one")
        sizes.append((_positive_int(pair[0], key), _positive_int(pair[1], key)))
    if not sizes:
        raise ConfigError(f"{key} is empty; give at least one [width, height]")
    return sizes
