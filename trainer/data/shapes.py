"""The embedded default dataset: captioned images of colored shapes, generated deterministically.

Each image shows one figure (a shape in a color and a size) in one cell of a 3 x 3 grid, on a muted
background; its caption names the attributes through one of several templates, and its json carries
them all. Everything comes from a per-sample RNG seeded with ``"{seed}:{split}:{index}"``, so a
sample depends only on the seed, the split and its index: never on the number of worker processes,
and the train and val splits are different streams.

    python -m trainer.data.shapes --out data/shapes/out --train 20000 --val 1000 --size 64 --workers 2

writes ``train-000000.tar ...``, ``val-000000.tar`` and their ``<split>.manifest.json`` through
:class:`trainer.data.shards.ShardWriter`, and ``shapes.json`` with the parameters, which is what
:func:`ensure_shapes` looks at to skip work that is already done. See ``data/shapes/README.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import multiprocessing
import os
import random
import re
import time
from collections import deque
from collections.abc import Iterator
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from trainer.data.shards import ShardWriter, encode_image, manifest_path

log = logging.getLogger(__name__)

# Bump when a change to the generator changes its output, so ensure_shapes regenerates old data.
GENERATOR_VERSION = 1
PARAMS_FILE = "shapes.json"
SPLITS = ("train", "val")
SUPERSAMPLE = 4  # figures are drawn at 4x the image size and box-filtered down, for antialiased edges
CHUNK = 250  # samples per task handed to a worker process

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")

# Figure colors: saturated or extreme, at least 100 apart (Euclidean, in RGB) from one another.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "orange": (250, 130, 0),
    "yellow": (250, 230, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

# Backgrounds: muted mid tones, none named after a figure color, each at least MIN_CONTRAST away
# (Euclidean, in RGB) from every figure color, so a figure always stands out from its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "light gray": (175, 175, 175),
    "dark gray": (85, 85, 85),
    "beige": (190, 175, 145),
    "sage": (120, 150, 110),
    "taupe": (145, 130, 115),
    "slate": (90, 105, 135),
    "khaki": (165, 155, 95),
}
MIN_CONTRAST = 90.0

# Side of the figure's bounding box as a fraction of the grid cell's side.
SIZES: dict[str, float] = {"small": 0.4, "medium": 0.62, "large": 0.86}
CELL_MARGIN = 0.05  # fraction of the cell kept free on every side of the figure

ROW_NAMES = ("top", "center", "bottom")
COL_NAMES = ("left", "center", "right")


def position_name(row: int, col: int) -> str:
    """The name of grid cell ``(row, col)``: ``"top left"``, ``"top center"``, ..., ``"center"``, ``"bottom right"``."""
    if row == 1 and col == 1:
        return "center"
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


# (row, col, name) for the nine cells, row by row from the top left.
POSITIONS: tuple[tuple[int, int, str], ...] = tuple((r, c, position_name(r, c)) for r in range(3) for c in range(3))

# Every template names the size, color, shape and position; some also the background.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {color} {shape} in the {position}",
    "{position}: {color} {shape}, {size}",
    "a {color} {shape}, {size}, at the {position} of the image",
    "a {size} {color} {shape} in the {position} on a {background} background",
    "{size} {color} {shape}, {position}",
    "there is a {size} {color} {shape} in the {position} of the picture",
    "the {position} of the image shows a {size} {color} {shape}",
    "a {color} {shape} ({size}) at the {position}, {background} background",
    "an image of a {size} {shape} in {color}, placed in the {position}",
    "{color} {shape}, {size}, {position}, on {background}",
)


# What a caption that names one attribute says (AttributeCaptions), in the dataset's words.
SINGLE_ATTRIBUTE_CAPTIONS: dict[str, str] = {
    "shape": "a {shape}",
    "color": "a {color} shape",
    "size": "a {size} shape",
    "position": "a shape in the {position}",
}


class AttributeCaptions:
    """A training caption transform (``data.caption_transform``) for the shapes data: with the probability given
    for an attribute, the caption is replaced by one that names only that attribute ("a triangle", "a shape in
    the top left", :data:`SINGLE_ATTRIBUTE_CAPTIONS`), from the sample's json; otherwise it is kept.

    Every dataset caption names size, color, shape and position, and in a batch of 64 color and position alone
    already tell the captions apart, so the contrastive loss hardly asks the image tower for shape. "a triangle"
    can only pick out its images by shape. Train with ``task.positives`` set to :func:`caption_attributes`, so
    that every triangle of the batch, not just the one image the caption was made from, counts as a match for
    "a triangle" (docs/benchmarks.md, "Seventh round"). A sample whose json lacks the attribute drawn keeps its
    caption, so the transform does nothing to other data.
    """

    def __init__(self, shape: float = 0.0, color: float = 0.0, size: float = 0.0, position: float = 0.0):
        self.probabilities = {"shape": shape, "color": color, "size": size, "position": position}
        for name, value in self.probabilities.items():
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"AttributeCaptions.{name} must be a probability in [0, 1], got {value!r}")
        if sum(self.probabilities.values()) > 1.0 + 1e-9:
            raise ValueError(
                f"AttributeCaptions: the probabilities add up to more than 1 ({self.probabilities}); each sample "
                f"gets at most one single-attribute caption"
            )

    def __call__(self, caption: str, meta: dict, rng: random.Random) -> str:
        draw = rng.random()
        for name, probability in self.probabilities.items():
            if draw < probability:
                if name not in meta:  # not a shapes sample (say, shapes_clip on other shards): left as it is
                    return caption
                return _articles(SINGLE_ATTRIBUTE_CAPTIONS[name].format(**{name: meta[name]}))
            draw -= probability
        return caption


def _unit_polygon(points: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Scale and center ``points`` so their bounding box's longer side spans [-0.5, 0.5]."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    scale = max(max(xs) - min(xs), max(ys) - min(ys))
    mid_x, mid_y = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return tuple(((x - mid_x) / scale, (y - mid_y) / scale) for x, y in points)


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = [-math.pi / 2 + i * math.pi / points for i in range(2 * points)]
    radii = [1.0 if i % 2 == 0 else inner for i in range(2 * points)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]


# Each shape as a polygon in unit coordinates (y down), centered on the origin.
_POLYGONS: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": _unit_polygon([(math.cos(2 * math.pi * i / 96), math.sin(2 * math.pi * i / 96)) for i in range(96)]),
    "square": _unit_polygon([(0, 0), (1, 0), (1, 1), (0, 1)]),
    "triangle": _unit_polygon([(0.5, 0), (1, 1), (0, 1)]),
    "star": _unit_polygon(_star()),
    "diamond": _unit_polygon([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]),
}


def sample_attributes(rng: random.Random) -> dict[str, Any]:
    """Draw one sample's attributes: shape, color, size, grid cell, offset inside the cell, background.

    ``offset`` is the figure center's displacement from the cell center, as fractions of the cell's
    side; it is bounded so the figure stays inside the cell with :data:`CELL_MARGIN` to spare.
    Values are rounded so the dict survives a json round trip unchanged (and renders the same).
    """
    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    size = rng.choice(list(SIZES))
    row, col, position = rng.choice(POSITIONS)
    slack = (1.0 - SIZES[size]) / 2 - CELL_MARGIN
    offset = [round(rng.uniform(-slack, slack), 4), round(rng.uniform(-slack, slack), 4)]
    background = rng.choice(list(BACKGROUNDS))
    return {
        "shape": shape,
        "color": color,
        "color_rgb": list(COLORS[color]),
        "size": size,
        "size_fraction": SIZES[size],
        "row": row,
        "col": col,
        "position": position,
        "offset": offset,
        "background": background,
        "background_rgb": list(BACKGROUNDS[background]),
    }


def figure_box(attributes: dict[str, Any], size: int = 64) -> tuple[float, float, float, float]:
    """The figure's bounding box ``(x0, y0, x1, y1)`` in pixels of a ``size`` x ``size`` image."""
    cell = size / 3
    side = attributes["size_fraction"] * cell
    center_x = (attributes["col"] + 0.5 + attributes["offset"][0]) * cell
    center_y = (attributes["row"] + 0.5 + attributes["offset"][1]) * cell
    return (center_x - side / 2, center_y - side / 2, center_x + side / 2, center_y + side / 2)


def render(attributes: dict[str, Any], size: int = 64) -> Image.Image:
    """Draw the sample described by ``attributes`` as a ``size`` x ``size`` RGB image.

    The figure is drawn at :data:`SUPERSAMPLE` times the size and box-filtered down, so its edges
    are antialiased while its interior and the background keep their exact colors.
    """
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), tuple(attributes["background_rgb"]))
    x0, y0, x1, y1 = (v * SUPERSAMPLE for v in figure_box(attributes, size))
    # Pillow fills the pixels from floor(min) to floor(max) of a polygon's coordinates; insetting by
    # half a pixel on each side fills the pixels whose centers lie inside the box, and none outside.
    mid_x, mid_y, side = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0 - 1
    points = [(mid_x + u * side, mid_y + v * side) for u, v in _POLYGONS[attributes["shape"]]]
    ImageDraw.Draw(image).polygon(points, fill=tuple(attributes["color_rgb"]))
    return image.resize((size, size), Image.Resampling.BOX)


def make_caption(attributes: dict[str, Any], rng_or_template_id: random.Random | int) -> str:
    """Caption ``attributes`` with template ``rng_or_template_id`` (an index into :data:`CAPTION_TEMPLATES`),
    or with one drawn from the given RNG."""
    if isinstance(rng_or_template_id, random.Random):
        template_id = rng_or_template_id.randrange(len(CAPTION_TEMPLATES))
    else:
        template_id = rng_or_template_id
    fields = {key: attributes[key] for key in ("size", "color", "shape", "position", "background")}
    return _articles(CAPTION_TEMPLATES[template_id].format(**fields))


def _articles(text: str) -> str:
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)  # "a orange" -> "an orange"


def caption_attributes(caption: str) -> dict[str, str]:
    """The attributes a caption names with the dataset's words: any of size, color, shape, position and
    background, each named once ("a triangle" -> {"shape": "triangle"}; "a red or blue circle" names no color).
    A background ("on a gray background", "on gray") is not taken for the figure's color. With ``task.positives``
    (trainer.tasks.clip) it tells which images of a batch a caption fits: those whose json agrees on every
    attribute the caption names."""
    text = caption.lower()
    backgrounds = "|".join(re.escape(name) for name in sorted(BACKGROUNDS, key=len, reverse=True))
    background_phrase = re.compile(rf"\b(?:on (?:an? )?)?({backgrounds}) background\b|\bon ({backgrounds})\b")
    named_backgrounds = background_phrase.findall(text)
    text = background_phrase.sub(" ", text)
    words = set(re.findall(r"[a-z]+", text))

    def one_of(names) -> str | None:
        found = [name for name in names if name in words]
        return found[0] if len(found) == 1 else None

    positions = [name for _, _, name in POSITIONS if re.search(rf"\b{name}\b", text)]
    position = max(positions, key=len) if positions else None  # "top center" also contains "center"
    background = {a or b for a, b in named_backgrounds}
    found = {
        "size": one_of(SIZES),
        "color": one_of(COLORS),
        "shape": one_of(SHAPES),
        "position": position,
        "background": background.pop() if len(background) == 1 else None,
    }
    return {name: value for name, value in found.items() if value is not None}


def parse_caption(caption: str) -> dict[str, str] | None:
    """The size, color, shape and position a caption asks for (any template's wording, or a free prompt
    that names all four with the dataset's words), or None when it does not name all four
    (:func:`caption_attributes`)."""
    found = caption_attributes(caption)
    fields = ("size", "color", "shape", "position")
    return {name: found[name] for name in fields} if all(name in found for name in fields) else None


def zero_shot_classes(prompts_per_class: int = 48, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Class names and prompt templates for CLIP zero-shot classification of each attribute.

    ``field`` is the key of the sample's json that holds the true class name; a class's prompts are
    ``template.format(class_name)``, averaged over the templates (prompt ensembling, as CLIP's
    ImageNet evaluation does). The templates are the dataset's own caption templates with the other
    attributes filled in at random (a fixed seed), so a class's mean embedding marginalizes over
    them; templates that would put the class right after "a" are left out ("a orange").
    """
    rng = random.Random(f"zero-shot:{seed}")
    values = {
        "size": list(SIZES),
        "color": list(COLORS),
        "shape": list(SHAPES),
        "position": [name for _, _, name in POSITIONS],
        "background": list(BACKGROUNDS),
    }
    specs = {}
    for attribute in ("color", "shape", "size", "position"):
        usable = [t for t in CAPTION_TEMPLATES if f"a {{{attribute}}}" not in t and f"A {{{attribute}}}" not in t]
        templates = []
        for i in range(prompts_per_class):
            fields = {key: rng.choice(options) for key, options in values.items()}
            fields[attribute] = "{}"
            templates.append(_articles(usable[i % len(usable)].format(**fields)))
        specs[attribute] = {"classes": values[attribute], "templates": templates, "field": attribute}
    return specs


def _encode(image: Image.Image, image_format: str, quality: int) -> bytes:
    """Encode like :func:`trainer.data.shards.encode_image`, but JPEGs without chroma subsampling.

    The figures are a few pixels wide; 4:2:0 subsampling smears their color into the background
    (errors of 60+ levels at edges at quality 95), 4:4:4 keeps edges within about 20 levels.
    """
    if image_format != "jpg":
        return encode_image(image, image_format, quality)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _sample_rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"{seed}:{split}:{index}")


def _render_chunk(task: tuple[str, int, int, int, int, str, int]) -> list[tuple[str, bytes, str, dict[str, Any]]]:
    """Render and encode samples ``start:stop`` of a split: a list of (key, image bytes, caption, meta)."""
    split, seed, start, stop, size, image_format, quality = task
    samples = []
    for index in range(start, stop):
        rng = _sample_rng(seed, split, index)
        attributes = sample_attributes(rng)
        template_id = rng.randrange(len(CAPTION_TEMPLATES))
        caption = make_caption(attributes, template_id)
        box = [round(v, 2) for v in figure_box(attributes, size)]
        meta = {**attributes, "bbox": box, "template": template_id, "split": split, "index": index, "seed": seed}
        data = _encode(render(attributes, size), image_format, quality)
        samples.append((f"{split}_{index:08d}", data, caption, meta))
    return samples


def _rendered_chunks(tasks: list[tuple], workers: int) -> Iterator[list[tuple[str, bytes, str, dict[str, Any]]]]:
    """Render ``tasks`` in order, in ``workers`` processes, with at most two chunks per worker in flight
    (so a writer slower than the renderers does not pile rendered chunks up in memory)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_render_chunk, tasks)
        return
    with multiprocessing.Pool(min(workers, len(tasks))) as pool:
        pending: deque[AsyncResult] = deque()
        for task in tasks:
            pending.append(pool.apply_async(_render_chunk, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    n: int,
    *,
    seed: int = 0,
    size: int = 64,
    samples_per_shard: int = 1000,
    workers: int = 1,
    image_format: str = "jpg",
    quality: int = 95,
) -> dict:
    """Write ``n`` samples of ``split`` as shards ``<split>-NNNNNN.tar`` plus ``<split>.manifest.json``.

    ``workers`` processes render and encode chunks of consecutive indices; this process writes them
    in index order, so the output is the same for any number of workers. Shards of this split left
    over from an earlier, larger run are removed. Returns the manifest.
    """
    if n < 0:
        raise ValueError(f"the number of samples must not be negative, got {n}")
    if size < 3:
        raise ValueError(f"image size must be at least 3 pixels (a 3 x 3 grid), got {size}")
    ext = "jpg" if image_format.lower() == "jpeg" else image_format.lower()
    tasks = [(split, seed, start, min(start + CHUNK, n), size, ext, quality) for start in range(0, n, CHUNK)]
    started = time.perf_counter()
    with ShardWriter(out_dir, split, samples_per_shard, image_format=ext, quality=quality) as writer:
        for chunk in _rendered_chunks(tasks, workers):
            for key, data, caption, meta in chunk:
                writer.write(key, data, caption, meta, image_ext=ext, size=(size, size))
    manifest = writer.manifest
    written = {shard["url"] for shard in manifest["shards"]}
    for path in Path(out_dir).glob(f"{split}-*.tar"):
        if re.fullmatch(rf"{re.escape(split)}-\d+\.tar", path.name) and path.name not in written:
            path.unlink()
    seconds = time.perf_counter() - started
    log.info(
        "shapes: wrote %d %s samples in %d shards to %s in %.1f s (%.0f images/s, %d workers)",
        n,
        split,
        len(manifest["shards"]),
        out_dir,
        seconds,
        n / max(seconds, 1e-9),
        workers,
    )
    return manifest


def ensure_shapes(
    out_dir: str | os.PathLike,
    n_train: int = 20000,
    n_val: int = 1000,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 1000,
    workers: int = 2,
    *,
    image_format: str = "jpg",
    quality: int = 95,
    force: bool = False,
) -> Path:
    """Make sure ``out_dir`` holds the shapes dataset with these parameters; generate it if not.

    Does nothing when both manifests exist and ``shapes.json`` records the same parameters (and the
    same :data:`GENERATOR_VERSION`). Otherwise the parameters file is removed first and written last,
    so a run that is interrupted leaves no record and is redone next time. ``workers`` only changes
    the speed, not the data, so it is not a parameter. Returns ``out_dir`` as a :class:`Path`.
    """
    out = Path(out_dir)
    params = {
        "version": GENERATOR_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "size": size,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "image_format": "jpg" if image_format.lower() == "jpeg" else image_format.lower(),
        "quality": quality,
    }
    params_path = out / PARAMS_FILE
    complete = all(manifest_path(out, split).exists() for split in SPLITS)
    if not force and complete and params_path.exists() and json.loads(params_path.read_text()) == params:
        log.info("shapes: %s is up to date (%s)", out, params_path)
        return out
    out.mkdir(parents=True, exist_ok=True)
    params_path.unlink(missing_ok=True)
    for split, n in zip(SPLITS, (n_train, n_val), strict=True):
        write_split(
            out,
            split,
            n,
            seed=seed,
            size=size,
            samples_per_shard=samples_per_shard,
            workers=workers,
            image_format=params["image_format"],
            quality=quality,
        )
    tmp = params_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(params, indent=1))
    os.replace(tmp, params_path)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: generate the shapes dataset (skipped when ``--out`` already holds the same one)."""
    parser = argparse.ArgumentParser(prog="latentloom-shapes", description="Generate the shapes dataset as shards.")
    parser.add_argument("--out", required=True, help="output folder for shards, manifests and shapes.json")
    parser.add_argument("--train", type=int, default=20000, help="number of training samples")
    parser.add_argument("--val", type=int, default=1000, help="number of validation samples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="processes rendering and encoding images")
    parser.add_argument("--format", default="jpg", choices=["jpg", "jpeg", "png", "webp"], help="image format")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    parser.add_argument("--force", action="store_true", help="regenerate even if --out is up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    out = ensure_shapes(
        args.out,
        n_train=args.train,
        n_val=args.val,
        size=args.size,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        image_format=args.format,
        quality=args.quality,
        force=args.force,
    )
    print(f"shapes dataset in {out} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
