"""Turning a user's own images into shards: a folder with ``.txt`` captions, or a CSV/TSV/JSONL/parquet table.

    collect_items(input) -> [Item(path, caption, source, extra), ...]   sorted by source path
      -> seeded train/val split (by image path) -> decode + EXIF-rotate + resize + encode (optionally in
      worker processes, output order unchanged) -> ShardWriter per split -> <prefix>.manifest.json

Inputs:

- a folder: every image below it (``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``, in subfolders too,
  hidden files and folders left out), each with its caption in a sidecar text file of the same stem
  (``cats/a.jpg`` + ``cats/a.txt``);
- a table (``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``) with a path column and a caption column; relative
  paths are resolved against the table's folder, and every other column goes into the sample's json.

Each sample is written as ``key.<ext>``, ``key.txt`` and ``key.json`` (the img2dataset layout); the key is
the item's zero-padded index in the sorted item list, so it names the same image whatever else fails.
The json carries ``caption``, ``width``, ``height``, ``original_width``, ``original_height``, ``source``
(the path relative to the folder, or as written in the table) and the table's extra columns.

Images that cannot be read are skipped, logged with their path and reason, and listed in the result.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from trainer.data.shards import IMAGE_FORMATS, ShardWriter, encode_image, manifest_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
# Fields of the sample json that make_shards sets itself; table columns of these names are overridden.
RESERVED_FIELDS = ("key", "caption", "width", "height", "original_width", "original_height", "source")
KEY_DIGITS = 9


class IngestError(Exception):
    """A problem with the input or the options, with a message that says what to do."""


@dataclass(frozen=True)
class Item:
    """One image to write: where it is, its caption (``None`` when it has none), and extra json fields."""

    path: Path
    caption: str | None
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


# -- collecting items ---------------------------------------------------------------------------------


def collect_items(
    input: str | os.PathLike,
    caption_column: str = "caption",
    path_column: str = "path",
) -> list[Item]:
    """List the images of a folder or a table, sorted by source path (stable for repeated table rows).

    Raises :class:`IngestError` when the input does not exist, is of an unsupported kind, or a table
    lacks the path or caption column.
    """
    path = Path(input).expanduser()
    if not path.exists():
        raise IngestError(
            f"input {str(input)!r} does not exist; give a folder of images with .txt captions "
            f"or a table ({', '.join(TABLE_SUFFIXES)}) of image paths and captions"
        )
    if path.is_dir():
        items = _folder_items(path)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        items = _table_items(path, caption_column, path_column)
    else:
        raise IngestError(
            f"input {str(input)!r} is neither a folder nor a table: {path.suffix or 'no extension'!r} is not "
            f"supported; use a folder of images with .txt captions or a {', '.join(TABLE_SUFFIXES)} file"
        )
    return sorted(items, key=lambda item: item.source)


def _folder_items(root: Path) -> list[Item]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else None
            items.append(Item(path, caption, path.relative_to(root).as_posix()))
    return items


def _table_items(table: Path, caption_column: str, path_column: str) -> list[Item]:
    rows = list(_read_table(table))
    if rows and not any(caption_column in row for row in rows):
        raise IngestError(
            f"{table}: no column {caption_column!r} for captions (columns: {', '.join(map(str, rows[0]))}); "
            f"name it with --caption-column"
        )
    items, overridden = [], set()
    for number, row in enumerate(rows, start=1):
        value = row.get(path_column)
        if value is None or str(value).strip() == "":
            raise IngestError(
                f"{table}: row {number} has no {path_column!r} (columns: {', '.join(map(str, row))}); "
                f"name the image path column with --path-column"
            )
        source = str(value).strip()
        if "://" in source:
            raise IngestError(
                f"{table}: row {number} names a URL ({source}); make_shards reads local files only. "
                f"Download first, e.g. with img2dataset (see data/laion/README.md)"
            )
        caption = row.get(caption_column)
        extra = {str(k): _jsonable(v) for k, v in row.items() if k not in (path_column, caption_column, None)}
        overridden.update(k for k in extra if k in RESERVED_FIELDS)
        path = Path(source).expanduser()
        items.append(Item(path if path.is_absolute() else table.parent / path, _text(caption), source, extra))
    if overridden:
        log.warning("%s: columns %s are replaced by the values make_shards computes", table, sorted(overridden))
    return items


def _read_table(table: Path) -> Iterator[dict[str, Any]]:
    suffix = table.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(table, newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        with open(table, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as error:
                    raise IngestError(f"{table}: line {number} is not valid JSON: {error}") from error
                if not isinstance(row, dict):
                    raise IngestError(f"{table}: line {number} is not a JSON object")
                yield row
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise IngestError(f"reading {table} needs pyarrow: pip install pyarrow") from error
        yield from pq.read_table(table).to_pylist()


def _text(value: Any) -> str | None:
    return None if value is None else str(value).strip()


def _jsonable(value: Any) -> Any:
    """Keep a table value as it is when JSON can hold it, else write it as text (dates, decimals ...)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


# -- splitting ------------------------------------------------------------------------------------------


def split_items(items: list[Item], val_fraction: float, seed: int = 0) -> list[bool]:
    """Which items go to validation: a seeded ranking of the distinct image paths, the first fraction of them.

    Deterministic for the same paths and seed; all rows naming the same image land in the same split; an
    image keeps its split when others are added, except near the cut. With ``val_fraction > 0`` at least
    one image goes to validation and at least one to training.
    """
    if val_fraction <= 0:
        return [False] * len(items)
    sources = sorted({item.source for item in items}, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).digest())
    count = max(1, round(len(sources) * val_fraction))
    if count >= len(sources):
        raise IngestError(
            f"val_fraction={val_fraction} of {len(sources)} images leaves none for training; lower --val-fraction"
        )
    val = set(sources[:count])
    return [item.source in val for item in items]


# -- encoding -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """An image ready to write, with its size after and before resizing."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def encode_item(item: Item, image_format: str = "jpg", quality: int = 95, max_side: int | None = None) -> Encoded | str:
    """Read, upright (EXIF orientation), flatten transparency onto white, resize and encode one image.

    Returns the reason as a string when the file cannot be read, so that it can be reported and skipped.
    """
    try:
        with Image.open(item.path) as opened:
            image = ImageOps.exif_transpose(opened)  # a loaded copy; raises here on a truncated file
        data = encode_image(_on_white(image), image_format, quality, max_side)
        with Image.open(io.BytesIO(data)) as encoded:
            size = encoded.size
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for broken or odd files
        return f"{type(error).__name__}: {error}"
    return Encoded(data, size[0], size[1], image.width, image.height)


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with transparency onto white (a plain conversion would turn it black or noisy)."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return image
    rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def _encoded(
    items: list[Item], workers: int, image_format: str, quality: int, max_side: int | None
) -> Iterator[Encoded | str]:
    """``encode_item`` over ``items``, in order, in ``workers`` processes when more than one."""
    encode = functools.partial(encode_item, image_format=image_format, quality=quality, max_side=max_side)
    if workers <= 1:
        yield from map(encode, items)
        return
    # spawn, not fork: make_shards may be called from a process with threads (a training run)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(encode, items, chunksize=max(1, min(16, len(items) // (4 * workers))))


# -- writing --------------------------------------------------------------------------------------------


def make_shards(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prefix: str = "train",
    val_prefix: str = "val",
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    image_format: str = "jpg",
    quality: int = 95,
    val_fraction: float = 0.0,
    seed: int = 0,
    caption_column: str = "caption",
    path_column: str = "path",
    require_caption: bool = False,
    workers: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the images of ``input`` (a folder or a table, see the module docstring) as shards in ``out_dir``.

    Images without a caption are written with an empty one, or skipped with ``require_caption``.
    With ``val_fraction > 0`` a seeded share of the images goes to ``<val_prefix>-*.tar`` (see
    :func:`split_items`). Existing shards of the same prefix are an error unless ``overwrite``, which
    deletes them first (so no stale shard from an earlier, larger run stays beside the new ones).

    Returns ``{"out_dir", "manifests": {prefix: manifest}, "written", "skipped": [{"path", "reason"}],
    "uncaptioned"}``: ``written`` counts samples over all splits, ``uncaptioned`` those written with an
    empty caption. Raises :class:`IngestError` for bad input or options, and when no image could be read.
    """
    _check_options(prefix, val_prefix, samples_per_shard, max_side, image_format, quality, val_fraction, workers)
    items = collect_items(input, caption_column=caption_column, path_column=path_column)
    if not items:
        raise IngestError(f"no images found in {input} (looked for {', '.join(IMAGE_SUFFIXES)})")
    is_val = split_items(items, val_fraction, seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise IngestError(f"output {out} exists and is not a folder")
    _clear_previous(out, [prefix, val_prefix] if val_fraction > 0 else [prefix], overwrite)

    skipped: list[dict[str, str]] = []
    todo = []
    for index, item in enumerate(items):
        if require_caption and not item.caption:
            skipped.append(_skip(item, "no caption (--require-caption)"))
        else:
            todo.append(index)
    digits = max(KEY_DIGITS, len(str(len(items) - 1)))
    uncaptioned: list[str] = []
    writers: dict[str, ShardWriter] = {}
    with contextlib.ExitStack() as stack:
        encoded = stack.enter_context(
            contextlib.closing(_encoded([items[i] for i in todo], workers, image_format, quality, max_side))
        )
        for done, (index, result) in enumerate(zip(todo, encoded, strict=True), start=1):
            item = items[index]
            if isinstance(result, str):
                skipped.append(_skip(item, result))
                continue
            split = val_prefix if is_val[index] else prefix
            if split not in writers:
                writers[split] = stack.enter_context(ShardWriter(out, split, samples_per_shard))
            meta = {
                **item.extra,
                "width": result.width,
                "height": result.height,
                "original_width": result.original_width,
                "original_height": result.original_height,
                "source": item.source,
            }
            if not item.caption:
                uncaptioned.append(item.source)
            key = f"{index:0{digits}d}"
            writers[split].write(key, result.data, item.caption or "", meta, image_ext=_extension(image_format))
            if done % 1000 == 0:
                log.info("%d of %d images", done, len(todo))
    written = sum(writer.manifest["total"] for writer in writers.values())
    if written == 0:
        raise IngestError(f"none of the {len(items)} images of {input} could be written; see the reasons above")
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5 else "")
        log.warning("%d images have no caption and were written with an empty one: %s", len(uncaptioned), shown)
    return {
        "out_dir": str(out),
        "manifests": {split: writer.manifest for split, writer in writers.items()},
        "written": written,
        "skipped": skipped,
        "uncaptioned": len(uncaptioned),
    }


def _check_options(
    prefix: str,
    val_prefix: str,
    samples_per_shard: int,
    max_side: int | None,
    image_format: str,
    quality: int,
    val_fraction: float,
    workers: int,
) -> None:
    for name, value in (("prefix", prefix), ("val_prefix", val_prefix)):
        if not re.fullmatch(r"[\w.-]+", value):
            raise IngestError(f"{name} {value!r} must be a plain file name part (letters, digits, '_', '-', '.')")
    fmt = image_format.lower()
    problems = [
        (prefix == val_prefix, "prefix and val_prefix must differ"),
        (samples_per_shard < 1, f"samples_per_shard must be at least 1, got {samples_per_shard}"),
        (max_side is not None and max_side < 1, f"max_side must be at least 1, got {max_side}"),
        (fmt not in IMAGE_FORMATS, f"image format {image_format!r} is not one of {sorted(IMAGE_FORMATS)}"),
        (not 1 <= quality <= 100, f"quality must be in 1..100, got {quality}"),
        (not 0 <= val_fraction < 1, f"val_fraction must be in [0, 1), got {val_fraction}"),
        (workers < 0, f"workers must not be negative, got {workers}"),
    ]
    for failed, message in problems:
        if failed:
            raise IngestError(message)


def _clear_previous(out: Path, prefixes: Iterable[str], overwrite: bool) -> None:
    for prefix in prefixes:
        pattern = re.compile(rf"{re.escape(prefix)}-\d+\.tar")
        old = [p for p in out.glob(f"{prefix}-*.tar") if pattern.fullmatch(p.name)]
        if manifest_path(out, prefix).exists():
            old.append(manifest_path(out, prefix))
        if not old:
            continue
        if not overwrite:
            raise IngestError(
                f"{out} already holds shards with prefix {prefix!r} ({len(old)} files); "
                f"pass --overwrite to replace them, or choose another --out or --prefix"
            )
        for path in old:
            path.unlink()


def _skip(item: Item, reason: str) -> dict[str, str]:
    log.warning("skipped %s: %s", item.source, reason)
    return {"path": item.source, "reason": reason}


def _extension(image_format: str) -> str:
    fmt = image_format.lower()
    return "jpg" if fmt == "jpeg" else fmt
