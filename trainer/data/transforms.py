"""Image decoding and transforms: decode -> resize shorter side -> crop -> flip -> tensor -> normalize.

Written with Pillow and NumPy directly: per sample this is the whole cost of the data pipeline, and
doing it in one pass (JPEG draft-mode decoding at reduced scale, one resize, one crop, one
normalization) is what keeps the pipeline near the speed of a bare Pillow loop.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.data.buckets import Size, covering_side, resize_and_crop
from trainer.errors import ConfigError

# The statistics images are normalized with. "clip" is what open_clip's models expect; "symmetric"
# maps [0, 1] to [-1, 1], which is what the autoencoder and diffusion stages use.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
CROPS = ("center", "random")
RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# The pipeline's default for data.max_image_pixels: larger images (after JPEG draft-mode reduction) are skipped
# unread. 64 MiP decode to ~200 MB of RGB; a 12000 x 12000 PNG would take 430 MB.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class ImageTooLarge(ValueError):
    """An image whose header gives more pixels than the limit (JPEGs: after draft-mode reduction)."""


def open_image(data: bytes) -> Image.Image:
    """Image bytes -> a PIL image of which only the header has been read. An image that Pillow refuses as a
    decompression bomb (over twice ``PIL.Image.MAX_IMAGE_PIXELS``) raises :class:`ImageTooLarge`."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(str(error)) from error


def prepare_decode(
    image: Image.Image, min_side: int | None = None, cover: Size | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Set an opened image up for decoding, before any pixel is read: JPEGs in draft mode (see
    :func:`decode_image`). Raises :class:`ImageTooLarge` when the image as it would then be decoded has more than
    ``max_pixels`` pixels (None: no limit)."""
    if cover is not None:
        min_side = covering_side(*image.size, cover)
    drafted = False
    if min_side is not None and image.format == "JPEG":
        width, height = image.size
        scale = min(width, height) / min_side
        if scale >= 2:
            # floor, not round: a size rounded up makes Pillow skip the reduction and decode at full size
            image.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
            drafted = True
    if max_pixels is not None and image.width * image.height > max_pixels:
        how = " after draft-mode reduction" if drafted else ""
        raise ImageTooLarge(f"{image.width} x {image.height} pixels{how}, above the limit of {max_pixels}")
    return image


def decode_image(
    data: bytes, min_side: int | None = None, cover: Size | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode image bytes (jpg, png, webp, ...) into an RGB PIL image.

    With ``min_side``, JPEGs are decoded in draft mode at the smallest power-of-two reduction that
    still leaves the shorter side at least ``min_side`` pixels (much faster for large photos, and
    the resize that follows needs no more). ``cover`` (a bucket's (width, height)) sets ``min_side``
    to what scaling the image to cover that size leaves of its shorter side. An image of more than
    ``max_pixels`` pixels as decoded (so a large JPEG that draft mode reduces may pass) raises
    :class:`ImageTooLarge` before any pixel is decoded.
    """
    image = prepare_decode(open_image(data), min_side, cover, max_pixels)
    image.load()
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA") else image.convert("RGB")
    return image


@dataclass
class ImageTransform:
    """Resize the shorter side to ``resize_size`` (default ``size``), crop ``size`` x ``size``,
    optionally flip, normalize.

    Returns a float tensor (3, size, size). ``rng`` (a ``random.Random``) drives the random crop and
    the flip, so a seeded pipeline produces the same augmentations again. A ``resize_size`` larger
    than ``size`` crops patches at higher resolution (e.g. 64 px patches of photos scaled to 256 px).
    """

    size: int = 256
    crop: str = "center"
    flip: bool = False
    normalize: str | Sequence[Sequence[float]] = "clip"
    resample: str = "bicubic"
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"image size must be positive, got {self.size}")
        if self.resize_size is not None and self.resize_size < self.size:
            raise ConfigError(f"resize_size ({self.resize_size}) must be at least the crop size ({self.size})")
        if self.crop not in CROPS:
            raise ConfigError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.resample not in RESAMPLE:
            raise ConfigError(f"resample must be one of {sorted(RESAMPLE)}, got {self.resample!r}")
        if isinstance(self.normalize, str):
            if self.normalize not in NORMALIZATIONS:
                raise ConfigError(
                    f"normalize must be one of {sorted(NORMALIZATIONS)} or [mean, std]; got {self.normalize!r}"
                )
            mean, std = NORMALIZATIONS[self.normalize]
        else:
            mean, std = self.normalize
        # (x / 255 - mean) / std  ==  x * scale - offset, per channel, shaped (3, 1, 1)
        inv_std = 1.0 / np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self._scale = (inv_std / 255.0).astype(np.float32)
        self._offset = (np.asarray(mean, dtype=np.float32).reshape(3, 1, 1) * inv_std).astype(np.float32)

    def resize_and_crop(self, image: Image.Image, rng: random.Random | None = None) -> Image.Image:
        width, height = image.size
        target = self.resize_size or self.size
        scale = target / min(width, height)
        new_w, new_h = max(target, round(width * scale)), max(target, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), RESAMPLE[self.resample], reducing_gap=None)
        if self.crop == "random" and rng is not None:
            left, top = rng.randint(0, new_w - self.size), rng.randint(0, new_h - self.size)
        else:
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        if (left, top, new_w, new_h) != (0, 0, self.size, self.size):
            image = image.crop((left, top, left + self.size, top + self.size))
        if self.flip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def fit(self, image: Image.Image, size: Size, rng: random.Random | None = None) -> torch.Tensor:
        """For an aspect-ratio bucket: scale to cover ``size`` (width, height), crop only the excess (``crop``:
        center, or random with ``rng``), optionally flip, normalize -> (3, height, width). ``size`` and
        ``resize_size`` do not apply."""
        image = resize_and_crop(image, size, crop=self.crop, rng=rng, resample=RESAMPLE[self.resample])
        if self.flip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.to_tensor(image)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8 view
        # one pass from uint8 into a C-ordered float32 array, then one in-place subtraction
        array = np.multiply(pixels, self._scale, dtype=np.float32, order="C")
        array -= self._offset
        return torch.from_numpy(array)

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.to_tensor(self.resize_and_crop(image, rng))


def denormalize(images: torch.Tensor, normalize: str = "clip") -> torch.Tensor:
    """Invert the normalization: back to [0, 1] (clamped), for logging and saving grids."""
    mean, std = NORMALIZATIONS[normalize]
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * std_t + mean_t).clamp(0, 1)
