"""Real photographs for the autoencoder stage: the color and grayscale photos scikit-image ships
inside its package (nothing is downloaded), written as shards.

- ``train``: whole photos scaled to ``scale`` px on the shorter side; training cuts random crops.
- ``val``: held-out photos (never in train), each cut into a fixed grid of ``crop`` px patches at
  the same scale, so validation PSNR is measured on the same patches every time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data.shards import ShardWriter

TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "stereo_motorcycle",
    "camera",
    "coins",
    "moon",
    "grass",
    "brick",
    "clock",
    "cell",
)
VAL_PHOTOS = ("chelsea", "coffee", "gravel")


def load_photo(name: str) -> Image.Image:
    """One of scikit-image's bundled photos as an RGB PIL image."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        pixels = (255 * (pixels.astype(np.float64) / max(pixels.max(), 1))).astype(np.uint8)
    return Image.fromarray(pixels).convert("RGB")


def scaled(image: Image.Image, shorter_side: int) -> Image.Image:
    factor = shorter_side / min(image.size)
    size = (max(shorter_side, round(image.width * factor)), max(shorter_side, round(image.height * factor)))
    return image.resize(size, Image.Resampling.LANCZOS)


def ensure_photos(out_dir: str | Path, scale: int = 256, crop: int = 64, val_crops: int = 16) -> Path:
    """Write the photo shards into ``out_dir`` unless they are there with the same parameters."""
    out_dir = Path(out_dir)
    params = {"scale": scale, "crop": crop, "val_crops": val_crops, "train": TRAIN_PHOTOS, "val": VAL_PHOTOS}
    stamp = out_dir / "photos.json"
    if stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(params)):
        return out_dir
    stamp.unlink(missing_ok=True)
    with ShardWriter(out_dir, "train", samples_per_shard=1, image_format="png") as writer:
        for name in TRAIN_PHOTOS:
            writer.write(name, scaled(load_photo(name), scale), f"a photo: {name.replace('_', ' ')}", {"photo": name})
    with ShardWriter(out_dir, "val", samples_per_shard=len(VAL_PHOTOS) * val_crops, image_format="png") as writer:
        for name in VAL_PHOTOS:
            image = scaled(load_photo(name), scale)
            side = int(np.sqrt(val_crops))
            xs = np.linspace(0, image.width - crop, side).round().astype(int)
            ys = np.linspace(0, image.height - crop, side).round().astype(int)
            for row, y in enumerate(ys):
                for col, x in enumerate(xs):
                    patch = image.crop((int(x), int(y), int(x) + crop, int(y) + crop))
                    meta = {"photo": name, "x": int(x), "y": int(y)}
                    writer.write(f"{name}-{row}-{col}", patch, f"a photo: {name}", meta)
    stamp.write_text(json.dumps(params))
    return out_dir
