"""Inspecting shards: sample counts, member extensions, faults, a few captions, a grid of images.

Samples are read and judged by the training pipeline's own stages (:meth:`ShardDataset.read_samples` and
:meth:`ShardDataset.decode_sample`), so a sample reported here as broken is exactly one that training
would skip, for the same reason (:data:`trainer.data.pipeline.FAULTS`). Two checks are added:

- ``shard_error`` is counted once per unreadable, missing or truncated shard (the reader may count one
  truncated tar more than once), with its first error message;
- ``short_shard``: a shard that reads without an error but holds fewer samples than its manifest lists (a
  tar cut off exactly at a member boundary reads cleanly, so only the manifest can tell), when the URLs
  name a manifest.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from trainer.data.pipeline import IMAGE_EXTENSIONS, FaultCounter, ShardDataset
from trainer.data.shards import read_manifest
from trainer.data.sources import local_path, resolve_sources, scheme
from trainer.data.transforms import ImageTransform, decode_image

# Decoding at a small size is enough to find broken images (JPEGs are then decoded in draft mode).
CHECK_SIZE = 32
CAPTION_LINES = 2


class _FaultLog(FaultCounter):
    """A :class:`FaultCounter` that keeps every fault for the report instead of logging the first few."""

    def __init__(self) -> None:
        super().__init__(log_first=0)
        self.records: list[dict[str, Any]] = []

    def skip(self, reason: str, url: Any = None, key: Any = None, error: BaseException | None = None) -> None:
        super().skip(reason, url, key, error)
        self.records.append(
            {"reason": reason, "url": url, "key": key, "error": f"{type(error).__name__}: {error}" if error else None}
        )


def inspect_shards(
    urls: Any,
    *,
    captions: int = 5,
    grid: str | os.PathLike | None = None,
    grid_size: int = 16,
    grid_cell: int = 160,
    grid_captions: bool = True,
) -> dict[str, Any]:
    """Read every sample of ``urls`` (anything :func:`~trainer.data.sources.resolve_sources` accepts).

    Returns a JSON-serializable summary: ``shards`` (``url``, ``samples``, ``expected`` from a manifest or
    None, ``error``), ``total`` samples, ``valid`` samples (training would use them), ``extensions``
    (``{"jpg,json,txt": n}``), ``faults`` (counts by reason), ``problems`` (every fault with shard, key and
    error), the first ``captions`` captions, and ``grid`` (the path written, when ``grid`` is given: the
    first ``grid_size`` valid samples, ``grid_cell`` pixels each, captions below with ``grid_captions``).
    """
    shard_urls = [url for source in resolve_sources(urls) for url in source.urls]
    if not shard_urls:
        raise ValueError(f"{urls!r} names no shards")
    expected = _manifest_counts(urls)
    missing = {url for url in shard_urls if (path := local_path(url)) is not None and not os.path.isfile(path)}
    readable = [url for url in shard_urls if url not in missing]
    dataset = (
        ShardDataset(
            readable,
            batch_size=1,
            shuffle=False,
            require_caption=False,
            transform=ImageTransform(size=CHECK_SIZE, normalize="none"),
            name="inspect",
        )
        if readable
        else None
    )

    rng = random.Random(0)
    shards, problems, valid = [], [], 0
    extensions: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    shown: list[dict[str, str]] = []
    thumbnails: list[tuple[Image.Image, str]] = []
    for url in shard_urls:
        recorder = _FaultLog()
        count = 0
        if url in missing:
            recorder.skip("shard_error", url, None, FileNotFoundError(f"{url} does not exist"))
        else:
            for sample in dataset.read_samples(iter([url]), recorder):
                count += 1
                extensions[",".join(sorted(k for k in sample if not k.startswith("__")))] += 1
                item = dataset.decode_sample(sample, rng, recorder)
                if item is None:
                    continue
                if not item["caption"]:
                    recorder.skip("missing_caption", url, item["key"])
                    continue
                if len(shown) < captions:
                    shown.append({"key": item["key"], "caption": item["caption"]})
                if grid is not None and len(thumbnails) < grid_size:
                    image = decode_image(next(sample[e] for e in IMAGE_EXTENSIONS if e in sample), min_side=grid_cell)
                    image.thumbnail((grid_cell, grid_cell))
                    thumbnails.append((image, item["caption"]))
        shard_error = next((r for r in recorder.records if r["reason"] == "shard_error"), None)
        if shard_error is not None:
            problems.append({**shard_error, "url": url})
            faults["shard_error"] += 1
        elif expected.get(url) is not None and count < expected[url]:
            problems.append(
                {"reason": "short_shard", "url": url, "key": None, "error": f"{count} of {expected[url]} samples"}
            )
            faults["short_shard"] += 1
        sample_faults = [r for r in recorder.records if r["reason"] != "shard_error"]
        problems.extend(sample_faults)
        faults.update(r["reason"] for r in sample_faults)
        valid += count - len(sample_faults)
        shards.append(
            {
                "url": url,
                "samples": count,
                "expected": expected.get(url),
                "error": shard_error["error"] if shard_error is not None else None,
            }
        )

    summary: dict[str, Any] = {
        "shards": shards,
        "total": sum(shard["samples"] for shard in shards),
        "valid": valid,
        "extensions": dict(extensions.most_common()),
        "faults": dict(sorted(faults.items())),
        "problems": problems,
        "captions": shown,
        "grid": None,
    }
    if grid is not None and thumbnails:
        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        make_grid(thumbnails, grid_cell, grid_captions).save(grid)
        summary["grid"] = str(grid)
    return summary


def _manifest_counts(urls: Any) -> dict[str, int]:
    """Sample counts by shard URL, from the local manifests that ``urls`` names (when it names any)."""
    parts = urls.split("::") if isinstance(urls, str) else urls if isinstance(urls, list) else []
    counts = {}
    for part in parts:
        if not isinstance(part, str):
            continue
        part = os.path.expanduser(part.strip())
        if part.endswith(".manifest.json") and scheme(part) == "":
            folder, name = os.path.split(part)
            manifest = read_manifest(folder, name.removesuffix(".manifest.json"))
            counts.update({os.path.join(folder, shard["url"]): shard["samples"] for shard in manifest["shards"]})
    return counts


def make_grid(samples: list[tuple[Image.Image, str]], cell: int = 160, captions: bool = True) -> Image.Image:
    """Images (fitted into ``cell`` x ``cell``) in a near-square grid, each optionally with its caption below."""
    columns = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / columns)
    font = ImageFont.load_default(size=max(8, cell // 14))
    line_height = font.getbbox("Hg")[3] + 2
    band = CAPTION_LINES * line_height + 4 if captions else 0
    grid = Image.new("RGB", (columns * cell, rows * (cell + band)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, (image, caption) in enumerate(samples):
        x, y = (index % columns) * cell, (index // columns) * (cell + band)
        grid.paste(ImageOps.pad(image.convert("RGB"), (cell, cell), color=(235, 235, 235)), (x, y))
        if captions:
            for line_number, line in enumerate(_wrap(caption, font, cell - 4)):
                draw.text((x + 2, y + cell + 2 + line_number * line_height), line, fill=(0, 0, 0), font=font)
    return grid


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Up to :data:`CAPTION_LINES` lines of ``text`` that fit ``width`` pixels, the last cut with '...'."""
    lines, words = [], text.split()
    while words and len(lines) < CAPTION_LINES:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if lines and (words or font.getlength(lines[-1]) > width):
        last = lines[-1]
        while last and font.getlength(f"{last}...") > width:
            last = last[:-1]
        lines[-1] = f"{last}..."
    return lines


def format_summary(summary: dict[str, Any], max_problems: int = 20) -> str:
    """The summary of :func:`inspect_shards` as text for a terminal."""
    width = max(len(shard["url"]) for shard in summary["shards"])
    lines = [f"{'shard':<{width}}  samples  expected  error"]
    for shard in summary["shards"]:
        expected = "-" if shard["expected"] is None else str(shard["expected"])
        lines.append(f"{shard['url']:<{width}}  {shard['samples']:>7}  {expected:>8}  {shard['error'] or ''}")
    lines.append(
        f"total: {summary['total']} samples in {len(summary['shards'])} shards, {summary['valid']} valid "
        f"(readable image and caption)"
    )
    lines.append("members per sample: " + (", ".join(f"{k}: {n}" for k, n in summary["extensions"].items()) or "-"))
    lines.append("faults: " + (", ".join(f"{k} {n}" for k, n in summary["faults"].items()) or "none"))
    for problem in summary["problems"][:max_problems]:
        key = f" key {problem['key']}" if problem["key"] is not None else ""
        error = f": {problem['error']}" if problem["error"] else ""
        lines.append(f"  {problem['reason']}: {problem['url']}{key}{error}")
    if len(summary["problems"]) > max_problems:
        lines.append(f"  ... and {len(summary['problems']) - max_problems} more (--json lists all)")
    if summary["captions"]:
        lines.append("captions:")
        lines.extend(f"  {shown['key']}: {shown['caption']}" for shown in summary["captions"])
    if summary["grid"]:
        lines.append(f"grid: {summary['grid']}")
    return "\n".join(lines)
