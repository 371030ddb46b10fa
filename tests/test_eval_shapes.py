"""The shapes evaluator: exact on the generator's own images (clean, JPEG, other sizes), robust to noise
and blur, no figure on a bare background, input forms, prompt parsing, scoring and the command line."""

from __future__ import annotations

import io
import json
import random
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from trainer.data.shapes import BACKGROUNDS, CAPTION_TEMPLATES, figure_box, make_caption, render, sample_attributes
from trainer.eval.shapes import attributes_from_prompt, evaluate, main, measure, score

NAMED = ("color", "shape", "position", "size")


@cache
def attribute_set(n: int, seed: int = 0) -> tuple[dict, ...]:
    return tuple(sample_attributes(random.Random(f"test-eval:{seed}:{i}")) for i in range(n))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """``image`` through JPEG as the shards hold it: no chroma subsampling."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def noisy(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def assert_accuracy(report: dict, minimum: dict[str, float]) -> None:
    accuracy = {name: report["accuracy"][name] for name in minimum}
    assert all(accuracy[name] >= minimum[name] for name in minimum), (accuracy, report["mistakes"])


@pytest.mark.parametrize(("size", "n", "seed"), [(64, 1000, 0), (32, 300, 1), (128, 200, 2)])
def test_rendered_images_are_read_right(size: int, n: int, seed: int) -> None:
    attributes = attribute_set(n, seed)
    report = evaluate([render(a, size) for a in attributes], attributes)
    assert report["images"] == report["found"] == n
    assert_accuracy(report, dict.fromkeys(NAMED, 0.99))


@pytest.mark.parametrize(("quality", "n"), [(90, 1000), (95, 300)])
def test_jpeg_images_are_read_right(quality: int, n: int) -> None:
    attributes = attribute_set(n, seed=3)
    report = evaluate([jpeg(render(a, 64), quality) for a in attributes], attributes)
    assert_accuracy(report, dict.fromkeys(NAMED, 0.99))


@pytest.mark.parametrize("damage", ["noise 10", "noise 20", "blur 0.5", "blur 1"])
def test_noisy_and_blurred_images_are_mostly_read_right(damage: str) -> None:
    # Measured on 1000 images: all 1.000 (module docstring); a bound with room, as for generated images.
    kind, amount = damage.split()
    rng = np.random.default_rng(0)
    attributes = attribute_set(200, seed=4)
    images = [render(a, 64) for a in attributes]
    if kind == "noise":
        images = [noisy(image, float(amount), rng) for image in images]
    else:
        images = [image.filter(ImageFilter.GaussianBlur(float(amount))) for image in images]
    report = evaluate(images, attributes)
    assert_accuracy(report, {"color": 0.99, "position": 0.99, "shape": 0.95, "size": 0.95})


def test_fitted_box_is_the_drawn_box() -> None:
    for attributes in attribute_set(200, seed=5):
        measured = measure(render(attributes, 64))
        assert np.allclose(measured["bbox"], figure_box(attributes, 64), atol=0.5), (attributes, measured)
        assert measured["size_fraction"] == pytest.approx(attributes["size_fraction"], rel=0.05)
        assert measured["fill_ratio"] > 0.3


def test_bare_background_has_no_figure() -> None:
    rng = np.random.default_rng(0)
    images = [Image.new("RGB", (64, 64), color) for color in BACKGROUNDS.values()]
    images += [noisy(Image.new("RGB", (size, size), (128, 128, 128)), 20, rng) for size in (32, 64, 128)]
    measurements = [measure(image) for image in images]
    assert not any(m["found"] for m in measurements)
    assert all(m[name] is None for m in measurements for name in NAMED)

    attributes = list(attribute_set(len(images)))
    report = score(measurements, attributes)
    assert report["found"] == 0
    assert report["accuracy"] == dict.fromkeys([*NAMED, "all"], 0.0)
    assert all(mistake["measured"] == "none" for mistake in report["mistakes"]["shape"])


def test_arrays_of_any_layout_and_size() -> None:
    attributes = attribute_set(1, seed=6)[0]
    image = render(attributes, 64)
    expected = {name: attributes[name] for name in NAMED}
    pixels = np.asarray(image)
    for form in (pixels, pixels.astype(np.float32) / 255, np.moveaxis(pixels, -1, 0).astype(np.float64) / 255):
        measured = measure(form)
        assert {name: measured[name] for name in NAMED} == expected
        assert measured["bbox"] == measure(image)["bbox"]

    large = measure(render(attributes, 256))  # shrunk to 128 px, reported in the input's pixels
    assert {name: large[name] for name in NAMED} == expected
    assert np.allclose(large["bbox"], figure_box(attributes, 256), atol=2.0)
    wide = measure(image.resize((96, 64), Image.Resampling.BICUBIC))  # not square: the grid still holds
    assert (wide["color"], wide["position"]) == (attributes["color"], attributes["position"])
    assert wide["center"][0] == pytest.approx(sum(figure_box(attributes, 64)[0::2]) / 2 * 1.5, abs=1.5)


def test_attributes_are_read_off_every_caption_template() -> None:
    for attributes in attribute_set(100, seed=7):
        for template in range(len(CAPTION_TEMPLATES)):
            caption = make_caption(attributes, template)
            assert attributes_from_prompt(caption) == {name: attributes[name] for name in NAMED}, caption
    assert attributes_from_prompt("A large blue Square") == {"color": "blue", "shape": "square", "size": "large"}
    assert attributes_from_prompt("a red star in the top center")["position"] == "top center"
    assert attributes_from_prompt("a cat") == {}


def test_score_counts_only_named_attributes() -> None:
    found = {"found": True, "color": "red", "shape": "star", "position": "center", "size": "small"}
    missing = {"found": False, **dict.fromkeys(NAMED)}
    asked = [
        {"color": "red", "shape": "star", "position": "center"},  # all right; size not asked
        {"color": "blue", "shape": "star", "position": "center", "size": "small"},  # color wrong
        {"color": "red", "shape": "circle"},  # nothing found
    ]
    report = score([found, found, missing], asked)
    assert report["counts"] == {"color": 3, "shape": 3, "position": 2, "size": 1}
    assert report["correct"] == {"color": 1, "shape": 2, "position": 2, "size": 1}
    assert report["accuracy"] == {"color": 0.3333, "shape": 0.6667, "position": 1.0, "size": 1.0, "all": 0.3333}
    assert report["found"] == 2
    assert report["mistakes"]["color"] == [
        {"expected": "blue", "measured": "red", "count": 1},
        {"expected": "red", "measured": "none", "count": 1},
    ]
    assert report["mistakes"]["position"] == []
    with pytest.raises(ValueError):
        score([found], asked)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = []
    for i, attributes in enumerate(attribute_set(8, seed=8)):
        render(attributes, 64).save(tmp_path / f"{i:04d}.png")
        line = {"file": f"{i:04d}.png", "prompt": make_caption(attributes, i), "seed": i}
        if i % 2:  # half name their attributes, the others leave them to the prompt (as tools/sample.py)
            line["attributes"] = {name: attributes[name] for name in NAMED}
        lines.append(line)
    Image.new("RGB", (64, 64), BACKGROUNDS["sage"]).save(tmp_path / "empty.png")
    lines.append({"file": "empty.png", "prompt": "a small red circle in the top left", "seed": 8})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    out = tmp_path / "report.json"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed["images"] == 9 and printed["found"] == 8
    assert printed["accuracy"] == dict.fromkeys([*NAMED, "all"], round(8 / 9, 4))
    assert saved["accuracy"] == printed["accuracy"]
    assert [record["file"] for record in saved["per_image"]] == [line["file"] for line in lines]
    assert saved["per_image"][-1]["measured"]["found"] is False

    assert main([str(tmp_path / "missing")]) == 2
    assert "prompts.jsonl" in capsys.readouterr().err
