"""Score generated shapes images against their prompts, with no network: segment, then measure.

``measure(image)`` finds the one figure in an image of the shapes dataset (or a model's attempt at
one) and names its color, shape, position and size; ``evaluate(images, attributes)`` measures a
prompt set and reports the accuracy per attribute with the most common mistakes.

How an image is measured (at its own size, shrunk first to at most :data:`MAX_SIDE` pixels):

1. **Background**: the median of the border pixels; the noise level, the median distance of the
   border pixels from it.
2. **Figure**: each pixel's distance from the background, after a light blur. When no pixel, after a
   blur of at least 1 px, is as far as :data:`MIN_CONTRAST` and :data:`NOISE_FACTOR` times the noise
   level, or the figure would cover less than :data:`MIN_AREA_FRACTION` of the image, there is none:
   ``found`` is False and every attribute None. Otherwise the figure is the connected component, of
   the pixels beyond half the largest distance, with the largest summed distance.
3. **Color**: the median RGB of the figure's interior (its mask eroded by a pixel; for a figure too
   thin for that, its pixels at 80% of its largest distance), then the nearest of
   :data:`trainer.data.shapes.COLORS` in RGB.
4. **Coverage**: each pixel's fraction of figure, its color projected on the line from the background
   to the figure color (the named one when within :data:`COLOR_SNAP`), so antialiased, blurred and
   JPEG'd edges count for what they hold. Its sum and centroid give, for each candidate shape, the
   box in which the generator would draw that shape with that area and centroid.
5. **Shape**: each of :data:`trainer.data.shapes.SHAPES` is drawn by the generator's own
   :func:`~trainer.data.shapes.render` in its box, sharp and blurred by each of :data:`BLUR_SIGMAS`,
   and compared with the coverage: the smallest squared error wins.
6. **Position and size**: the winning box's center gives the grid cell, its side over the cell's side
   (``size_fraction``) the nearest of :data:`trainer.data.shapes.SIZES` (in ratio).

Accuracy of shape on the generator's own images (1000 per cell: ``render(sample_attributes(
random.Random(f"eval:{i}")), size)``; JPEG without chroma subsampling, as the shards hold it, unless
said; noise per channel on 0-255; ``ImageFilter.GaussianBlur`` with the radius at 64 px, scaled with
the image):

    ======================================  =====  =====  ======
    shape accuracy                          32 px  64 px  128 px
    ======================================  =====  =====  ======
    clean                                   1.000  1.000  1.000
    JPEG quality 95                         0.999  1.000  1.000
    JPEG quality 90                         0.989  1.000  1.000
    JPEG quality 90, 4:2:0 subsampling      0.886  0.992  1.000
    noise sigma 10                          0.988  1.000  1.000
    noise sigma 20                          0.953  1.000  1.000
    noise sigma 30                          0.874  0.997  1.000
    blur radius 0.5                         1.000  1.000  1.000
    blur radius 1                           1.000  1.000  0.995
    blur radius 1.5                         0.973  0.940  0.920
    ======================================  =====  =====  ======

Color and position are 1.000 in every cell but three: 32 px JPEG 4:2:0 (0.994, 0.997) and noise 30
(0.970, 0.971: 3% not found), 128 px blur 1.5 (color 0.998). Size is at least 0.990 but at 32 px
with JPEG 4:2:0 (0.938) and noise 30 (0.945). Through the real shards (``write_split``, val, seeds 0, 1
and 2, 2000 each) every attribute is 1.000 at 64 px at JPEG quality 95 and 90; at 32 px shape is
0.996-0.9995 at quality 95 and 0.985-0.989 at 90. The mistakes are on small figures (8 px wide at 64
px, 4 px at 32 px): mostly stars taken for circles, diamonds or squares. A plain background, bare or with
noise up to sigma 30, is ``found: False`` (3600 of 3600, at 32, 64 and 128 px). A 64 px image takes about 3 ms.

    python -m trainer.eval.shapes samples/ --out samples/report.json

reads ``samples/prompts.jsonl`` (one ``{"file": ..., "prompt": ..., "attributes": {...}}`` per image;
without ``attributes``, as ``tools/sample.py`` writes it, they are read off the prompt) and prints the
report.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from trainer.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, render
from trainer.errors import MissingFileError, UserError

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "position", "size")
MAX_SIDE = 128  # larger images are shrunk to this side first (a small figure is still 17 px wide)
MIN_CONTRAST = 40.0  # RGB distance from the background that a figure must reach somewhere
NOISE_FACTOR = 4.5  # ... and this many times the border's median distance (the noise reaches about 3.5)
MIN_AREA_FRACTION = 0.001  # a figure covers at least this much of the image (a small star: 0.7%)
MIN_CORE_PIXELS = 4  # below this, a figure's interior is the pixels at 80% of its largest distance
COLOR_SNAP = 50.0  # a figure color this close to a named one is taken to be it (colors are 100+ apart)
BLUR_SIGMAS: tuple[float, ...] = tuple(0.25 * i for i in range(9))  # template blurs tried, px at 64 px: 0-2
MISTAKES_LISTED = 5  # the most common mistakes per attribute in a report

_COLOR_NAMES = list(COLORS)
_COLOR_TABLE = np.array([COLORS[name] for name in _COLOR_NAMES], dtype=np.float64)  # (colors, 3)
_POSITION_NAMES = {(row, col): name for row, col, name in POSITIONS}
_VOCABULARY = {
    "color": list(COLORS),
    "shape": list(SHAPES),
    "position": [name for _, _, name in POSITIONS],
    "size": list(SIZES),
}


def _load(image: Image.Image | np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """``image`` as a square float (S, S, 3) array of 0-255 values, S at most :data:`MAX_SIDE`, and its (W, H).

    Arrays may be (H, W), (H, W, 1 | 3 | 4) or (1 | 3, H, W); float arrays whose values do not exceed
    1 are taken as 0-1. A non-square image is resized to a square: the grid is 3 x 3 either way.
    """
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if np.issubdtype(array.dtype, np.floating):
            array = np.nan_to_num(array) * (255.0 if array.size and np.nanmax(array) <= 1.0 else 1.0)
        image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    original = image.size
    image = image.convert("RGB")
    side = min(max(image.size), MAX_SIDE)
    if image.size != (side, side):
        shrinking = max(image.size) > side
        image = image.resize((side, side), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float64), original


def _template(shape: str, side: float, center: tuple[float, float], size: int) -> np.ndarray:
    """The coverage, 0-1 in a (size, size) array, of ``shape`` as the generator draws it in a box of
    ``side`` px centered on ``center`` (x, y)."""
    cell = size / 3
    attributes = {
        "shape": shape,
        "size_fraction": side / cell,
        "row": 0,
        "col": 0,
        "offset": [center[0] / cell - 0.5, center[1] / cell - 0.5],
        "color_rgb": [255, 255, 255],
        "background_rgb": [0, 0, 0],
    }
    return np.asarray(render(attributes, size).getchannel(0), dtype=np.float64) / 255.0


@cache
def _shape_geometry(shape: str) -> tuple[float, float, float, float]:
    """How the drawing of ``shape`` in a box of side ``s`` px depends on ``s``: ``(a, b, cx, cy)`` with
    ``sqrt(area) = a * s + b`` and centroid = box center + ``(cx, cy) * s``.

    Fitted once, by least squares, to the generator's renders at sides and sub-pixel positions from
    a small figure at 32 px to a large one at 128 px: rasterization adds its own fraction of a pixel.
    """
    sides, roots, centroids = [], [], []
    for side in (4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 40.0):
        for shift in (0.0, 0.25, 0.5, 0.75):
            canvas = math.ceil(side) + 4
            center = (canvas / 2 + shift, canvas / 2 + 0.75 - shift)
            coverage = _template(shape, side, center, canvas)
            area = float(coverage.sum())
            ys, xs = np.indices(coverage.shape) + 0.5
            sides.append(side)
            roots.append(math.sqrt(area))
            centroids.append(
                (float((coverage * xs).sum()) / area - center[0], float((coverage * ys).sum()) / area - center[1])
            )
    a, b = np.polyfit(sides, roots, 1)
    cx, cy = np.asarray(sides) @ np.asarray(centroids) / (np.asarray(sides) @ np.asarray(sides))
    return float(a), float(b), float(cx), float(cy)


def _blur_matrices(n: int, sigmas: Sequence[float]) -> np.ndarray:
    """(len(sigmas), n, n) matrices that blur a length-n signal with each Gaussian, zeros beyond its ends."""
    offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
    matrices = []
    for sigma in sigmas:
        if sigma == 0:
            matrices.append(np.eye(n))
            continue
        reach = np.arange(-n, n + 1)  # the kernel's sum over the whole line: what leaves the ends is lost
        matrices.append(np.exp(-0.5 * (offsets / sigma) ** 2) / np.exp(-0.5 * (reach / sigma) ** 2).sum())
    return np.stack(matrices)


def _fit_shapes(
    coverage: np.ndarray, near: np.ndarray, scale: float
) -> tuple[dict[str, float], dict[str, tuple[float, float, float]]]:
    """Fit each shape to ``coverage`` (zero outside ``near``): its squared error relative to the
    coverage's, and its box ``(side, center_x, center_y)``.

    Each shape's box is the one whose drawing has the coverage's area and centroid; the drawing is
    compared sharp and blurred by each of :data:`BLUR_SIGMAS` (times ``scale``), and the best counts.
    All in a window around ``near``, on the image's pixel grid.
    """
    pad = math.ceil(3 * max(BLUR_SIGMAS) * scale) + 2
    rows, cols = np.nonzero(near)
    top, left = max(int(rows.min()) - pad, 0), max(int(cols.min()) - pad, 0)
    bottom, right = min(int(rows.max()) + 1 + pad, near.shape[0]), min(int(cols.max()) + 1 + pad, near.shape[1])
    window = coverage[top:bottom, left:right]
    canvas = max(window.shape)
    area = float(window.sum())
    ys, xs = np.indices(window.shape) + 0.5
    centroid_x, centroid_y = float((window * xs).sum()) / area, float((window * ys).sum()) / area
    norm = max(float((window**2).sum()), 1e-6)
    sigmas = [sigma * scale for sigma in BLUR_SIGMAS]
    blur_rows, blur_cols = _blur_matrices(window.shape[0], sigmas), _blur_matrices(window.shape[1], sigmas)
    errors: dict[str, float] = {}
    boxes: dict[str, tuple[float, float, float]] = {}
    for shape in SHAPES:
        slope, intercept, offset_x, offset_y = _shape_geometry(shape)
        side = max((math.sqrt(area) - intercept) / slope, 1.0)
        center = (centroid_x - offset_x * side, centroid_y - offset_y * side)
        template = _template(shape, side, center, canvas)[: window.shape[0], : window.shape[1]]
        candidates = blur_rows @ template @ blur_cols.transpose(0, 2, 1)  # (blurs, h, w)
        errors[shape] = float(((candidates - window) ** 2).sum(axis=(1, 2)).min()) / norm
        boxes[shape] = (side, center[0] + left, center[1] + top)
    return errors, boxes


def _rounded(values: Iterable[float], digits: int = 1) -> list[float]:
    return [round(float(v), digits) for v in values]


def _not_found(background: np.ndarray, peak: float) -> dict[str, Any]:
    return {
        "found": False,
        **dict.fromkeys(ATTRIBUTES),
        "bbox": None,
        "center": None,
        "size_fraction": None,
        "fill_ratio": None,
        "figure_rgb": None,
        "background_rgb": _rounded(background),
        "contrast": round(peak, 1),
        "shape_errors": None,
    }


def measure(image: Image.Image | np.ndarray) -> dict[str, Any]:
    """Measure the figure in ``image``: its color, shape, position and size, by name, plus diagnostics.

    ``image`` is a PIL image or an array (see :func:`_load`) of any size. Returns ``found`` (False
    when nothing stands out from the background; then every attribute is None), ``color``,
    ``shape``, ``position``, ``size`` and: ``bbox``, the fitted box ``[x0, y0, x1, y1]``, and
    ``center``, in the input's pixels; ``size_fraction``, the box side over the cell side;
    ``fill_ratio``, the figure mask's pixels over its bounding box's; ``figure_rgb`` and
    ``background_rgb``, as measured; ``contrast``, the RGB distance from the background to the figure
    color used for coverage (without a figure: the largest distance found); ``shape_errors``, each
    shape's squared error relative to the figure's (the smallest names the shape).
    """
    pixels, (width, height) = _load(image)
    size = pixels.shape[0]
    scale = size / 64  # widths are given for a 64 px image

    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(ndimage.gaussian_filter(pixels, (0.5 * scale, 0.5 * scale, 0)) - background, axis=-1)
    detection = distance
    if scale < 2:  # detect on a blur of at least 1 px: noise would pass where a figure would not
        detection = np.linalg.norm(ndimage.gaussian_filter(pixels, (1.0, 1.0, 0)) - background, axis=-1)
    edge = np.concatenate([detection[0], detection[-1], detection[1:-1, 0], detection[1:-1, -1]])
    if detection.max() < max(MIN_CONTRAST, NOISE_FACTOR * float(np.median(edge))):
        return _not_found(background, float(detection.max()))
    peak = float(distance.max())

    labels, count = ndimage.label(distance > peak / 2)
    masses = ndimage.sum(distance, labels, index=np.arange(1, count + 1))
    mask = labels == 1 + int(np.argmax(masses))
    core = ndimage.binary_erosion(mask)
    if core.sum() < MIN_CORE_PIXELS:
        core = mask & (distance >= 0.8 * float(distance[mask].max()))
    figure = np.median(pixels[core], axis=0)
    color_distances = np.linalg.norm(_COLOR_TABLE - figure, axis=1)
    color = _COLOR_NAMES[int(np.argmin(color_distances))]
    reference = _COLOR_TABLE[int(np.argmin(color_distances))] if color_distances.min() < COLOR_SNAP else figure

    # Coverage, kept to the figure's surroundings: elsewhere it would only add noise.
    direction = reference - background
    coverage = (pixels - background) @ direction / float(direction @ direction)
    near = ndimage.binary_dilation(mask, iterations=max(3, round(3 * scale)))
    coverage = np.where(near, coverage, 0.0)
    if coverage.sum() < MIN_AREA_FRACTION * size**2:
        return _not_found(background, peak)
    errors, boxes = _fit_shapes(coverage, near, scale)
    shape = min(errors, key=errors.__getitem__)
    side, center_x, center_y = boxes[shape]

    cell = size / 3
    row, col = (min(max(int(v // cell), 0), 2) for v in (center_y, center_x))
    size_fraction = side / cell
    size_name = min(SIZES, key=lambda name: abs(math.log(size_fraction / SIZES[name])))
    rows, cols = np.nonzero(mask)
    fill_ratio = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    to_x, to_y = width / size, height / size
    bbox = (center_x - side / 2, center_y - side / 2, center_x + side / 2, center_y + side / 2)
    return {
        "found": True,
        "color": color,
        "shape": shape,
        "position": _POSITION_NAMES[row, col],
        "size": size_name,
        "bbox": _rounded((v * f for v, f in zip(bbox, (to_x, to_y, to_x, to_y), strict=True)), 2),
        "center": _rounded((center_x * to_x, center_y * to_y), 2),
        "size_fraction": round(size_fraction, 3),
        "fill_ratio": round(float(fill_ratio), 3),
        "figure_rgb": _rounded(figure),
        "background_rgb": _rounded(background),
        "contrast": round(float(np.linalg.norm(direction)), 1),
        "shape_errors": {name: round(value, 4) for name, value in errors.items()},
    }


def attributes_from_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt names, by the dataset's vocabulary: ``{"color": "red", "position": "top left", ...}``.

    Attributes the prompt does not name are left out; where names overlap ("center" in "top
    center"), the longest one wins. Background names never clash with figure colors.
    """
    found = {}
    for attribute, names in _VOCABULARY.items():
        for name in sorted(names, key=len, reverse=True):
            if re.search(rf"\b{re.escape(name)}\b", prompt, flags=re.IGNORECASE):
                found[attribute] = name
                break
    return found


def score(measurements: Sequence[dict[str, Any]], expected: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Compare measurements with the attributes asked for: accuracy, counts and mistakes per attribute.

    An attribute counts only for the images whose ``expected`` names it; an image without a figure
    counts as wrong for every attribute. ``accuracy["all"]`` is the fraction of images with every
    named attribute right. Mistakes read ``"none"`` where no figure was found.
    """
    if len(measurements) != len(expected):
        raise ValueError(f"{len(measurements)} measurements for {len(expected)} sets of attributes")
    confusion: dict[str, Counter[tuple[str, str]]] = {attribute: Counter() for attribute in ATTRIBUTES}
    all_right = 0
    for measured, asked in zip(measurements, expected, strict=True):
        named = [attribute for attribute in ATTRIBUTES if asked.get(attribute) is not None]
        for attribute in named:
            confusion[attribute][str(asked[attribute]), str(measured[attribute] or "none")] += 1
        all_right += all(measured[attribute] == asked[attribute] for attribute in named)
    counts = {attribute: sum(pairs.values()) for attribute, pairs in confusion.items()}
    correct = {
        attribute: sum(n for (asked, measured), n in pairs.items() if asked == measured)
        for attribute, pairs in confusion.items()
    }
    accuracy: dict[str, float | None] = {
        attribute: round(correct[attribute] / counts[attribute], 4) if counts[attribute] else None
        for attribute in ATTRIBUTES
    }
    accuracy["all"] = round(all_right / len(expected), 4) if expected else None
    mistakes = {
        attribute: [
            {"expected": asked, "measured": measured, "count": n}
            for (asked, measured), n in pairs.most_common()
            if asked != measured
        ][:MISTAKES_LISTED]
        for attribute, pairs in confusion.items()
    }
    return {
        "images": len(expected),
        "found": sum(bool(m["found"]) for m in measurements),
        "accuracy": accuracy,
        "correct": correct,
        "counts": counts,
        "mistakes": mistakes,
    }


def evaluate(images: Iterable[Image.Image | np.ndarray], attributes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Measure each image and :func:`score` it against the attributes its prompt asked for."""
    return score([measure(image) for image in images], attributes)


def evaluate_folder(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``folder/prompts.jsonl`` and the images it names: the report, and a record per image."""
    folder = Path(folder)
    index = folder / "prompts.jsonl"
    if not index.exists():
        raise MissingFileError(f"{index} does not exist: point at a folder of samples with a prompts.jsonl")
    records = []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{index}:{number} is not JSON ({error})") from error
        expected = entry.get("attributes") or attributes_from_prompt(entry.get("prompt", ""))
        if "file" not in entry or not expected:
            raise UserError(f"{index}:{number} needs a file and attributes, or a prompt that names some")
        path = folder / entry["file"]
        if not path.exists():
            raise MissingFileError(f"{path}, named on {index}:{number}, does not exist")
        with Image.open(path) as image:
            measured = measure(image)
        records.append(
            {"file": entry["file"], "prompt": entry.get("prompt"), "expected": expected, "measured": measured}
        )
    report = score([r["measured"] for r in records], [r["expected"] for r in records])
    return report, records


def main(argv: list[str] | None = None) -> int:
    """Command line: evaluate a folder of generated samples; print the report, optionally save it with every image's."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.eval.shapes",
        description="Measure color, shape, position and size in generated shapes images and score them "
        "against the attributes of their prompts (FOLDER/prompts.jsonl).",
    )
    parser.add_argument("folder", help="folder with prompts.jsonl and the images it names")
    parser.add_argument("--out", default=None, help="write the report, with each image's measurements, here (JSON)")
    args = parser.parse_args(argv)
    try:
        report, records = evaluate_folder(args.folder)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({**report, "per_image": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
