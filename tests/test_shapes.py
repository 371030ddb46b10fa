"""The shapes generator: determinism, attributes, captions, rendering, shards, ensure_shapes, the CLI."""

from __future__ import annotations

import io
import itertools
import json
import math
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import shapes
from trainer.data.pipeline import ShardDataset
from trainer.data.shards import read_manifest
from trainer.data.transforms import ImageTransform


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small render tasks, so that a few dozen samples already go through the worker pool."""
    monkeypatch.setattr(shapes, "CHUNK", 8)


def read_members(out_dir: Path, split: str) -> dict[str, bytes]:
    """Every tar member of a split (``key.ext`` -> bytes), over the shards its manifest lists."""
    members = {}
    for shard in read_manifest(out_dir, split)["shards"]:
        with tarfile.open(out_dir / shard["url"]) as tar:
            for info in tar.getmembers():
                members[info.name] = tar.extractfile(info).read()
    return members


def read_meta(out_dir: Path, split: str) -> list[dict]:
    members = read_members(out_dir, split)
    return [json.loads(data) for name, data in sorted(members.items()) if name.endswith(".json")]


def attributes_with(**changes) -> dict:
    attributes = shapes.sample_attributes(random.Random("fixed"))
    attributes.update(changes)
    attributes["color_rgb"] = list(shapes.COLORS[attributes["color"]])
    attributes["size_fraction"] = shapes.SIZES[attributes["size"]]
    attributes["position"] = shapes.position_name(attributes["row"], attributes["col"])
    return attributes


def test_palette_keeps_colors_apart() -> None:
    for a, b in itertools.combinations(shapes.COLORS.values(), 2):
        assert math.dist(a, b) >= 100
    for background in shapes.BACKGROUNDS.values():
        for color in shapes.COLORS.values():
            assert math.dist(background, color) >= shapes.MIN_CONTRAST
    assert not set(shapes.BACKGROUNDS) & set(shapes.COLORS)
    assert len(shapes.SHAPES) >= 3 and len(shapes.COLORS) >= 6 and list(shapes.SIZES) == ["small", "medium", "large"]


def test_positions_form_a_named_grid() -> None:
    assert [(r, c) for r, c, _ in shapes.POSITIONS] == [(r, c) for r in range(3) for c in range(3)]
    names = [name for _, _, name in shapes.POSITIONS]
    assert len(set(names)) == 9
    assert names[0] == "top left" and names[4] == "center" and names[8] == "bottom right"
    assert all(shapes.position_name(r, c) == name for r, c, name in shapes.POSITIONS)


def test_sample_attributes_are_seeded_and_survive_json() -> None:
    first = shapes.sample_attributes(random.Random("0:train:5"))
    assert first == shapes.sample_attributes(random.Random("0:train:5"))
    assert json.loads(json.dumps(first)) == first
    drawn = [shapes.sample_attributes(random.Random(i)) for i in range(300)]
    for key, values in (("shape", shapes.SHAPES), ("color", shapes.COLORS), ("size", shapes.SIZES)):
        assert {d[key] for d in drawn} == set(values)
    assert {d["position"] for d in drawn} == {name for _, _, name in shapes.POSITIONS}


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_figure_stays_in_its_cell_with_its_color(shape: str) -> None:
    size, cell = 64, 64 / 3
    colors = list(shapes.COLORS)
    for index, ((row, col, _), figure_size) in enumerate(itertools.product(shapes.POSITIONS, shapes.SIZES)):
        slack = (1 - shapes.SIZES[figure_size]) / 2 - shapes.CELL_MARGIN
        offset = [slack * (-1) ** index, slack * (-1) ** (index // 2)]  # push into the cell's corners
        color = colors[index % len(colors)]
        attributes = attributes_with(shape=shape, color=color, size=figure_size, row=row, col=col, offset=offset)
        image = np.asarray(shapes.render(attributes, size)).astype(int)
        assert image.shape == (size, size, 3)

        x0, y0, x1, y1 = shapes.figure_box(attributes, size)
        assert col * cell <= x0 < x1 <= (col + 1) * cell and row * cell <= y0 < y1 <= (row + 1) * cell
        inside_box = np.zeros((size, size), dtype=bool)
        inside_box[math.floor(y0) : math.ceil(y1), math.floor(x0) : math.ceil(x1)] = True
        background = np.array(attributes["background_rgb"])
        assert (image[~inside_box] == background).all(), "paint outside the figure's box"

        figure = (image == np.array(shapes.COLORS[color])).all(axis=-1)
        assert figure[round((y0 + y1) / 2 - 0.5), round((x0 + x1) / 2 - 0.5)], "the figure's center is not its color"
        assert figure.sum() >= 0.15 * (x1 - x0) * (y1 - y0)


def test_render_other_sizes() -> None:
    attributes = attributes_with(shape="circle", color="blue", size="large", row=1, col=1, offset=[0, 0])
    for size in (32, 96):
        image = shapes.render(attributes, size)
        assert image.size == (size, size)
        assert image.getpixel((size // 2, size // 2)) == shapes.COLORS["blue"]


def test_captions_mention_the_attributes() -> None:
    attributes = attributes_with(shape="triangle", color="orange", size="small", row=0, col=2, offset=[0, 0])
    captions = [shapes.make_caption(attributes, t) for t in range(len(shapes.CAPTION_TEMPLATES))]
    assert len(set(captions)) == len(captions) >= 5
    for caption in captions:
        for word in ("triangle", "orange", "small", "top right"):
            assert word in caption, (word, caption)
        assert "a orange" not in caption
    assert "an orange triangle" in captions[2]
    assert any(attributes["background"] in caption for caption in captions)
    assert shapes.make_caption(attributes, random.Random(3)) in captions


def test_split_is_the_same_for_any_number_of_workers(tmp_path: Path) -> None:
    kwargs = {"seed": 3, "size": 32, "samples_per_shard": 10}
    manifest = shapes.write_split(tmp_path / "one", "train", 45, workers=1, **kwargs)
    shapes.write_split(tmp_path / "two", "train", 45, workers=2, **kwargs)
    shapes.write_split(tmp_path / "again", "train", 45, workers=3, **kwargs)
    assert manifest["total"] == 45 and [s["samples"] for s in manifest["shards"]] == [10, 10, 10, 10, 5]
    one = read_members(tmp_path / "one", "train")
    assert len(one) == 3 * 45
    assert one == read_members(tmp_path / "two", "train") == read_members(tmp_path / "again", "train")


def test_seeds_and_splits_give_different_samples(tmp_path: Path) -> None:
    for seed in (0, 1):
        for split in ("train", "val"):
            shapes.write_split(tmp_path / str(seed), split, 20, seed=seed, size=32)

    def images(seed: int, split: str) -> list[bytes]:
        members = read_members(tmp_path / str(seed), split)
        return [data for name, data in sorted(members.items()) if name.endswith(".jpg")]

    assert images(0, "train") != images(1, "train")
    assert not set(images(0, "train")) & set(images(0, "val"))
    assert [m["caption"] for m in read_meta(tmp_path / "0", "train")] != [
        m["caption"] for m in read_meta(tmp_path / "0", "val")
    ]


def test_json_carries_the_attributes_and_renders_the_image(tmp_path: Path) -> None:
    shapes.write_split(tmp_path, "val", 12, seed=5, size=48, image_format="png", workers=2)
    members = read_members(tmp_path, "val")
    for meta in read_meta(tmp_path, "val"):
        key = meta["key"]
        assert key == f"val_{meta['index']:08d}" and meta["split"] == "val" and meta["seed"] == 5
        assert members[f"{key}.txt"].decode() == meta["caption"]
        assert meta["caption"] == shapes.make_caption(meta, meta["template"])
        assert (meta["width"], meta["height"]) == (48, 48)
        assert meta["color_rgb"] == list(shapes.COLORS[meta["color"]])
        assert meta["background_rgb"] == list(shapes.BACKGROUNDS[meta["background"]])
        assert meta["position"] == shapes.position_name(meta["row"], meta["col"])
        assert meta["bbox"] == [round(v, 2) for v in shapes.figure_box(meta, 48)]
        decoded = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])).convert("RGB"))
        assert (decoded == np.asarray(shapes.render(meta, 48))).all()


def test_jpeg_keeps_the_figure_color(tmp_path: Path) -> None:
    shapes.write_split(tmp_path, "train", 30, size=64)
    members = read_members(tmp_path, "train")
    for meta in read_meta(tmp_path, "train"):
        image = np.asarray(Image.open(io.BytesIO(members[f"{meta['key']}.jpg"]))).astype(int)
        x0, y0, x1, y1 = meta["bbox"]
        center = image[round((y0 + y1) / 2 - 0.5), round((x0 + x1) / 2 - 0.5)]
        assert np.abs(center - meta["color_rgb"]).max() <= 24
        assert np.abs(image[0, 0] - meta["background_rgb"]).max() <= 8 or meta["row"] == meta["col"] == 0


def test_shards_read_back_through_the_pipeline(tmp_path: Path) -> None:
    shapes.write_split(tmp_path, "train", 37, size=32, samples_per_shard=10, workers=2)
    dataset = ShardDataset(
        str(tmp_path / "train.manifest.json"),
        batch_size=8,
        mode="exact",
        transform=ImageTransform(size=32, normalize="none"),
    )
    batches = list(dataset)
    keys = [key for batch in batches for key in batch["key"]]
    assert sorted(keys) == [f"train_{i:08d}" for i in range(37)]
    assert batches[0]["image"].shape[1:] == (3, 32, 32)
    assert all(
        meta["caption"] == caption for b in batches for meta, caption in zip(b["meta"], b["caption"], strict=True)
    )
    assert batches[-1]["data_stats"]["counts"] == {}


def test_ensure_shapes_is_idempotent_and_regenerates_on_change(tmp_path: Path) -> None:
    out = tmp_path / "shapes"
    params = {"n_train": 30, "n_val": 10, "size": 32, "samples_per_shard": 10, "workers": 2}
    assert shapes.ensure_shapes(out, **params) == out
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "shapes.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train.manifest.json",
        "val-000000.tar",
        "val.manifest.json",
    ]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    shapes.ensure_shapes(out, **{**params, "workers": 1})  # the worker count is not a parameter
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    shapes.ensure_shapes(out, **{**params, "n_train": 15})
    assert read_manifest(out, "train")["total"] == 15
    assert not (out / "train-000002.tar").exists(), "a stale shard from the larger run was left behind"
    assert json.loads((out / "shapes.json").read_text())["n_train"] == 15

    (out / "shapes.json").unlink()  # as after an interrupted run
    before = (out / "val-000000.tar").stat().st_mtime_ns
    shapes.ensure_shapes(out, **{**params, "n_train": 15})
    assert (out / "shapes.json").exists() and (out / "val-000000.tar").stat().st_mtime_ns != before


def test_zero_shot_classes_name_json_fields(tmp_path: Path) -> None:
    shapes.write_split(tmp_path, "val", 5, size=32)
    meta = read_meta(tmp_path, "val")
    tasks = shapes.zero_shot_classes()
    assert {"color", "shape", "position"} <= set(tasks)
    for task in tasks.values():
        assert task["templates"] and all("{}" in template for template in task["templates"])
        for name, template in itertools.product(task["classes"], task["templates"]):
            assert not re.search(r"\ba [aeiou]", template.format(name)), template.format(name)
        assert all(m[task["field"]] in task["classes"] for m in meta)
    assert tasks["color"]["classes"] == list(shapes.COLORS)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--train", "12", "--val", "4", "--size", "24", "--samples-per-shard", "5"]
    shapes.main([*argv, "--workers", "1", "--format", "png"])
    assert "shapes dataset in" in capsys.readouterr().out
    assert read_manifest(out, "train")["total"] == 12 and read_manifest(out, "val")["total"] == 4
    params = json.loads((out / "shapes.json").read_text())
    assert params["image_format"] == "png" and params["size"] == 24
    assert any(name.endswith(".png") for name in read_members(out, "val"))


def test_parse_caption_reads_back_every_template() -> None:
    for index in range(300):
        attributes = shapes.sample_attributes(random.Random(index))
        for template in range(len(shapes.CAPTION_TEMPLATES)):
            parsed = shapes.parse_caption(shapes.make_caption(attributes, template))
            assert parsed == {key: attributes[key] for key in ("size", "color", "shape", "position")}
    assert shapes.parse_caption("a red circle") is None  # no size, no position
    assert shapes.parse_caption("a large red or blue circle in the center") is None  # two colors


def test_caption_attributes_reads_what_a_caption_names_and_no_more() -> None:
    for index in range(300):
        attributes = shapes.sample_attributes(random.Random(index))
        for template, wording in enumerate(shapes.CAPTION_TEMPLATES):
            named = shapes.caption_attributes(shapes.make_caption(attributes, template))
            expected = {key: attributes[key] for key in ("size", "color", "shape", "position")}
            if "{background}" in wording:
                expected["background"] = attributes["background"]
            assert named == expected, wording
    assert shapes.caption_attributes("a triangle") == {"shape": "triangle"}
    assert shapes.caption_attributes("a shape in the top center") == {"position": "top center"}
    assert shapes.caption_attributes("an orange shape on a light gray background") == {
        "color": "orange",
        "background": "light gray",
    }
    assert shapes.caption_attributes("a red or blue circle") == {"shape": "circle"}  # two colors: no color


def test_attribute_captions_name_one_attribute_at_the_rates_asked_and_are_read_back(tmp_path: Path) -> None:
    transform = shapes.AttributeCaptions(shape=0.5, position=0.25)
    rng = random.Random(0)
    counts = {"shape": 0, "position": 0, "kept": 0}
    for index in range(2000):
        attributes = shapes.sample_attributes(random.Random(index))
        caption = shapes.make_caption(attributes, 0)
        new = transform(caption, attributes, rng)
        named = shapes.caption_attributes(new)
        if new == caption:
            counts["kept"] += 1
        else:
            (name,) = named  # exactly one attribute, and the sample's own value
            assert named[name] == attributes[name]
            counts[name] += 1
    assert abs(counts["shape"] / 2000 - 0.5) < 0.04 and abs(counts["position"] / 2000 - 0.25) < 0.04
    # in the pipeline: training samples get them, deterministically per sample
    shapes.write_split(tmp_path, "train", 40, size=24, samples_per_shard=10, workers=1)

    def captions(num_workers: int) -> dict[str, str]:
        dataset = ShardDataset(
            str(tmp_path / "train.manifest.json"),
            batch_size=8,
            mode="exact",
            transform=ImageTransform(size=24, normalize="none"),
            caption_transform=shapes.AttributeCaptions(shape=0.5),
            num_workers=num_workers,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
        return {k: c for batch in loader for k, c in zip(batch["key"], batch["caption"], strict=True)}

    # drawn from each sample's RNG, which the pipeline seeds by epoch, worker and position (like the crops)
    first = captions(0)
    assert first == captions(0) and captions(2) == captions(2) and len(first) == 40
    rewritten = [c for c in first.values() if re.fullmatch(r"an? (circle|square|triangle|star|diamond)", c)]
    assert 10 <= len(rewritten) <= 30  # about half; the rest kept whole
    assert all(shapes.parse_caption(c) for c in first.values() if c not in rewritten)
    for bad in ({"shape": 1.5}, {"shape": 0.7, "color": 0.7}):
        with pytest.raises(ValueError, match="AttributeCaptions"):
            shapes.AttributeCaptions(**bad)
    # a sample of other data, whose json does not hold the attribute, keeps its caption
    assert shapes.AttributeCaptions(color=1.0)("a dog on a sofa", {"shape": "star"}, random.Random(0)) == (
        "a dog on a sofa"
    )
    from trainer.datamodule import ShardDataModule
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="data.caption_transform must be a callable"):
        ShardDataModule(train={"urls": str(tmp_path / "train.manifest.json")}, caption_transform="shape: 0.3")
