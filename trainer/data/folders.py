"""A user's folder of images (or caption table) as shards, made on first use and cached.

    cache_dir(input, root)            -> <root>/<input's name>-<hash of its absolute path>
    ensure_folder_shards(input, out)  -> out, holding train.manifest.json (+ val.manifest.json)

:func:`ensure_folder_shards` lists the input with :func:`trainer.data.ingest.collect_items` (images with
same-stem ``.txt`` captions, or a ``.csv/.tsv/.jsonl/.parquet`` table), fingerprints it (each image's
path, size and modification time, its caption, the table file's size and time) together with the
ingest options, and compares that with ``folder.json`` beside the shards. The same input and options:
nothing is done. Anything changed (an image added, removed or edited, a caption rewritten, another
``max_side``): the shards are rebuilt with :func:`trainer.data.ingest.make_shards`, and the log says why.
``folder.json`` is removed before a rebuild and written last, so an interrupted build is redone next time.
The check and the build happen under a lock on ``.folder.lock`` beside the shards, so processes that share
the folder (the first rank of every node on a shared filesystem, two runs at once) build it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.data.ingest import IMAGE_SUFFIXES, TABLE_SUFFIXES, IngestError, Item, collect_items, make_shards
from trainer.data.shards import manifest_path
from trainer.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

STAMP = "folder.json"
LOCK = ".folder.lock"  # held while the shards are checked and (re)built
VERSION = 1  # bump when the shards written for the same input and options change
MISSING_CAPTIONS = ("error", "skip", "empty")
SPLITS = ("train", "val")
VAL_FRACTION = 0.05  # the default share of the images held out for validation


def cache_dir(input: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Where the shards of ``input`` are cached: ``<root>/<name>-<8 hex digits of its absolute path>``."""
    path = Path(input).expanduser().resolve()
    name = re.sub(r"[^\w.-]+", "_", path.name) or "input"
    return Path(root) / f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def fingerprint(input: str | os.PathLike, items: list[Item]) -> str:
    """A hash of what the shards are made of: every image's path, size, modification time and caption
    (and the table's own size and time). Contents are not read: a file edited in place keeps its
    fingerprint only if its size and time stay the same, which editors and copies do not do."""
    digest = hashlib.sha256()
    path = Path(input).expanduser()
    if path.is_file():
        stat = path.stat()
        digest.update(f"table\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for item in items:
        try:
            stat = item.path.stat()
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        extra = json.dumps(item.extra, sort_keys=True, default=str)
        digest.update(f"{item.source}\0{size}\0{mtime}\0{item.caption}\0{extra}\n".encode())
    return digest.hexdigest()


def ensure_folder_shards(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = VAL_FRACTION,
    max_side: int | None = None,
    caption_column: str = "caption",
    path_column: str = "path",
    missing_captions: str = "error",
    samples_per_shard: int = 500,
    image_format: str = "jpg",
    quality: int = 95,
    seed: int = 0,
    workers: int = 0,
    key: str = "data.images",
) -> Path:
    """Make sure ``out_dir`` holds the shards of ``input`` for these options; (re)build them if not.

    ``missing_captions``: ``error`` (images without a caption stop the run, with their count and names),
    ``skip`` (leave them out) or ``empty`` (train on them with an empty caption: the autoencoder needs
    none). ``workers`` changes only the speed, so it is not part of the fingerprint. ``key`` names the
    config key the input came from, in error messages. Raises :class:`~trainer.errors.MissingFileError`
    for a missing input and :class:`~trainer.errors.ConfigError` for an input that cannot be trained on.
    """
    if missing_captions not in MISSING_CAPTIONS:
        raise ConfigError(f"missing_captions must be one of {MISSING_CAPTIONS}, got {missing_captions!r}")
    source = Path(input).expanduser()
    check_input(source, key)
    try:
        items = collect_items(source, caption_column=caption_column, path_column=path_column)
    except IngestError as error:
        raise ConfigError(f"{key}: {error}") from error
    if not items:
        raise ConfigError(
            f"{key}: no images in {source} (looked for {' '.join(IMAGE_SUFFIXES)}, in subfolders too); "
            "give a folder of images, each with its caption in a .txt of the same name, or a caption table"
        )
    uncaptioned = [item.source for item in items if not item.caption]
    # "skip" with nothing captioned would leave nothing to train on
    if uncaptioned and (missing_captions == "error" or (missing_captions == "skip" and len(uncaptioned) == len(items))):
        raise ConfigError(_uncaptioned_message(key, source, uncaptioned, len(items), caption_column))
    out = Path(out_dir)
    options = {
        "version": VERSION,
        "val_fraction": val_fraction,
        "max_side": max_side,
        "caption_column": caption_column,
        "path_column": path_column,
        "missing_captions": missing_captions,
        "samples_per_shard": samples_per_shard,
        "image_format": image_format,
        "quality": quality,
        "seed": seed,
    }
    record = {"input": str(source.resolve()), "options": options, "fingerprint": fingerprint(source, items)}
    with contextlib.suppress(OSError):  # a folder that cannot be created fails below, with its path
        out.mkdir(parents=True, exist_ok=True)
    # one builder at a time: the first process (a node's first rank on a shared filesystem, or another run on
    # the same folder) builds, the others wait and then find the shards complete
    with _exclusive(out / LOCK, key):
        stamp = out / STAMP
        previous = _read_stamp(stamp)
        if previous is not None and {k: previous.get(k) for k in record} == record and _complete(out, val_fraction):
            log.info(
                "%s: reusing the shards in %s (%d images, unchanged since they were written)", key, out, len(items)
            )
            return out
        if previous is None:
            log.info(
                "%s: writing the %d images of %s as shards into %s (later runs reuse them)",
                key,
                len(items),
                source,
                out,
            )
        else:
            changed = "the images or captions" if previous.get("options") == options else "the ingest options"
            log.info(
                "%s: %s changed since %s was written: rebuilding its shards (%d images)", key, changed, out, len(items)
            )

        stamp.unlink(missing_ok=True)
        _clear(out)
        try:
            result = make_shards(
                source,
                out,
                samples_per_shard=samples_per_shard,
                max_side=max_side,
                image_format=image_format,
                quality=quality,
                val_fraction=val_fraction,
                seed=seed,
                caption_column=caption_column,
                path_column=path_column,
                require_caption=missing_captions == "skip",
                workers=workers,
            )
        except IngestError as error:
            raise ConfigError(f"{key}: {error}") from error
        if val_fraction > 0 and "val" not in result["manifests"]:
            raise ConfigError(f"{key}: none of the validation images could be read (see the warnings above)")
        if result["skipped"]:
            log.warning(
                "%s: %d images were left out (each reported above with its reason)", key, len(result["skipped"])
            )
        counts = {split: manifest["total"] for split, manifest in result["manifests"].items()}
        record.update(images=len(items), written=counts, skipped=result["skipped"])
        tmp = stamp.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, stamp)
        log.info("%s: wrote %s samples into %s", key, " + ".join(f"{n} {split}" for split, n in counts.items()), out)
        return out


@contextlib.contextmanager
def _exclusive(lock: Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (flock). Where that cannot be had (a folder this user cannot write, a
    filesystem without locks) go on without it: complete shards are still reused, and a build that cannot
    write fails on its own with the path."""
    try:
        handle = open(lock, "a")  # noqa: SIM115 - closed below
    except OSError:
        try:
            handle = open(lock)  # noqa: SIM115 - flock works on a read-only descriptor too
        except OSError as error:
            log.warning("%s: cannot open the lock file %s (%s); going on without the lock", key, lock, error)
            yield
            return
    with handle:
        try:
            _wait_for_lock(handle, key, lock.parent)
        except OSError as error:  # no locks on this filesystem (some network filesystems)
            log.warning("%s: cannot lock %s (%s); going on without the lock", key, lock, error)
        yield


def _wait_for_lock(handle: Any, key: str, folder: Path, report_every: float = 60.0) -> None:
    """Take the exclusive lock on ``handle``, saying so when another process holds it, and again every
    ``report_every`` seconds while it still does: a long build elsewhere shows as waiting, not as a hang."""
    started = time.monotonic()
    next_report = started
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if now >= next_report:
                waited = f" ({(now - started) / 60:.0f} min so far)" if now > started + 1 else ""
                log.info("%s: another process is writing the shards in %s; waiting for it%s", key, folder, waited)
                next_report = now + report_every
            time.sleep(0.5)


def check_input(source: Path, key: str = "data.images") -> None:
    """A clear error for an input that does not exist or is neither a folder nor a table."""
    if not source.exists():
        raise MissingFileError(
            f"{key}={source} does not exist; give a folder of images with a .txt caption beside each "
            f"(a.jpg + a.txt), or a caption table ({', '.join(TABLE_SUFFIXES)})"
        )
    if source.is_file() and source.suffix.lower() not in TABLE_SUFFIXES:
        raise ConfigError(
            f"{key}={source} is a file but not a caption table ({', '.join(TABLE_SUFFIXES)}); "
            "give the folder that holds the images, or a table of image paths and captions"
        )


def _uncaptioned_message(key: str, source: Path, uncaptioned: list[str], total: int, column: str) -> str:
    shown = ", ".join(uncaptioned[:5]) + (f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5 else "")
    where = (
        f"fill in the {column!r} column of {source.name}"
        if source.is_file()
        else "write each caption into a .txt file of the same name beside its image (a.jpg -> a.txt)"
    )
    if len(uncaptioned) == total:
        return f"{key}: none of the {total} images of {source} has a caption ({shown}); {where}"
    return (
        f"{key}: {len(uncaptioned)} of {total} images of {source} have no caption ({shown}); {where}, or set "
        "data.ingest.missing_captions=skip to leave them out (=empty to train on them with an empty caption)"
    )


def _read_stamp(stamp: Path) -> dict[str, Any] | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def _complete(out: Path, val_fraction: float) -> bool:
    splits = SPLITS if val_fraction > 0 else SPLITS[:1]
    for split in splits:
        try:
            manifest = json.loads(manifest_path(out, split).read_text())
        except (OSError, ValueError):
            return False
        if not all((out / shard["url"]).is_file() for shard in manifest.get("shards", [])):
            return False
    return True


def _clear(out: Path) -> None:
    """Remove the shards and manifests of an earlier build (this folder is the cache's own)."""
    for split in SPLITS:
        for path in out.glob(f"{split}-*.tar"):
            path.unlink()
        manifest_path(out, split).unlink(missing_ok=True)
