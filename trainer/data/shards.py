"""Writing shards in the img2dataset layout (``key.jpg``, ``key.txt``, ``key.json``) plus a manifest.

Every writer of shards in the project (the shapes generator, ``tools/make_shards.py``) goes through
:class:`ShardWriter`, so every shard set has the same layout and a ``<prefix>.manifest.json`` beside
it that lists the shards and their sample counts.

Each tar is written to a temporary name and renamed when complete, so a crash never leaves a
truncated shard under a final name.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode_image(image: Image.Image, fmt: str = "jpg", quality: int = 95, max_side: int | None = None) -> bytes:
    """Encode a PIL image to bytes, optionally shrinking it so its longer side is at most ``max_side``."""
    fmt = fmt.lower()
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt!r} is not supported; use one of {sorted(IMAGE_FORMATS)}")
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    if image.mode not in ("RGB", "L") or (fmt in ("jpg", "jpeg") and image.mode != "RGB"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if IMAGE_FORMATS[fmt] in ("JPEG", "WEBP"):
        options["quality"] = quality
    image.save(buffer, format=IMAGE_FORMATS[fmt], **options)
    return buffer.getvalue()


def manifest_path(out_dir: str | os.PathLike, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}.manifest.json"


def read_manifest(out_dir: str | os.PathLike, prefix: str) -> dict:
    """Read the manifest :class:`ShardWriter` wrote for ``prefix`` in ``out_dir``."""
    path = manifest_path(out_dir, prefix)
    if not path.exists():
        raise FileNotFoundError(f"no shard manifest at {path}; shards written by ShardWriter have one")
    return json.loads(path.read_text())


class ShardWriter:
    """Writes samples into ``<out_dir>/<prefix>-000000.tar``, ``-000001.tar``, ... and a manifest.

    Use as a context manager; :meth:`write` takes one sample, :attr:`manifest` is available after
    closing. ``image`` may be a PIL image (encoded with ``image_format``/``quality``/``max_side``) or
    already-encoded bytes (written as they are, with ``image_ext`` naming their format).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "train",
        samples_per_shard: int = 1000,
        image_format: str = "jpg",
        quality: int = 95,
        max_side: int | None = None,
        digits: int = 6,
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.image_format = image_format.lower()
        self.quality = quality
        self.max_side = max_side
        self.digits = digits
        self.shards: list[dict] = []
        self._tar: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._count = 0
        self.manifest: dict | None = None

    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:0{self.digits}d}.tar"

    def _open_next(self) -> None:
        name = self._shard_name(len(self.shards))
        self._tmp = self.out_dir / f".{name}.tmp"
        # a fixed mtime makes the same samples give byte-identical shards
        self._tar = wds.TarWriter(str(self._tmp), mtime=0)
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = self._shard_name(len(self.shards))
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append({"url": name, "samples": self._count})
        self._tar, self._tmp = None, None

    def write(
        self,
        key: str,
        image: Image.Image | bytes,
        caption: str | None,
        meta: dict | None = None,
        image_ext: str | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        """Add one sample. For pre-encoded ``image`` bytes, ``size`` (width, height) saves re-reading them."""
        if isinstance(image, Image.Image):
            data = encode_image(image, self.image_format, self.quality, self.max_side)
            ext = "jpg" if self.image_format == "jpeg" else self.image_format
            size = _encoded_size(data)
        else:
            data, ext = image, (image_ext or self.image_format)
            size = size or _encoded_size(data)
        self.write_members(key, {ext: data}, caption, {"width": size[0], "height": size[1], **(meta or {})})

    def write_members(self, key: str, members: dict[str, bytes], caption: str | None, meta: dict | None = None) -> None:
        """Add one sample whose members are given as bytes by extension (e.g. ``latents.npy``), no image."""
        if self._tar is None:
            self._open_next()
        record: dict[str, Any] = {"key": key, "caption": caption, **(meta or {})}
        sample = {"__key__": key, **members, "json": json.dumps(record).encode()}
        if caption is not None:
            sample["txt"] = caption.encode()
        self._tar.write(sample)
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._close_current()

    def close(self) -> dict:
        self._close_current()
        total = sum(s["samples"] for s in self.shards)
        last = len(self.shards) - 1
        if last < 0:
            pattern = None  # nothing was written
        elif last == 0:
            pattern = self._shard_name(0)
        else:
            pattern = f"{self.prefix}-{{{0:0{self.digits}d}..{last:0{self.digits}d}}}.tar"
        self.manifest = {"prefix": self.prefix, "pattern": pattern, "total": total, "shards": self.shards}
        tmp = manifest_path(self.out_dir, self.prefix).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, manifest_path(self.out_dir, self.prefix))
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written temporary behind
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


def _encoded_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size
