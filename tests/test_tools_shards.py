"""tools/make_shards.py and tools/inspect_shards.py on real photos (skimage.data, shipped with scikit-image)."""

from __future__ import annotations

import csv
import io
import json
import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from skimage import data as skdata

from trainer.data.ingest import IngestError, collect_items, make_shards
from trainer.data.inspect import inspect_shards
from trainer.data.pipeline import ShardDataset
from trainer.data.shards import read_manifest
from trainer.data.sources import expand_urls
from trainer.data.transforms import ImageTransform

REPO = Path(__file__).resolve().parents[1]
# file name below the folder -> (skimage.data function, caption); camera is grayscale, rocket is saved as JPEG
PHOTOS = {
    "animals/chelsea.png": ("chelsea", "a tabby cat looking at the camera"),
    "astronaut.png": ("astronaut", "an astronaut in an orange suit"),
    "camera.png": ("camera", "a man with a camera on a tripod, black and white"),
    "coffee.png": ("coffee", "a cup of coffee on a saucer"),
    "space/rocket.jpg": ("rocket", "a rocket on the launch pad at night"),
}


def write_photos(folder: Path, captions: bool = True) -> dict[str, tuple[np.ndarray, str]]:
    """Save the photos (with .txt sidecars) below ``folder``; returns source -> (pixels as decoded, caption)."""
    written = {}
    for name, (function, caption) in PHOTOS.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skdata, function)()).save(path, quality=92)
        if captions:
            path.with_suffix(".txt").write_text(caption + "\n")
        written[name] = (np.asarray(Image.open(path)), caption)
    return written


def read_samples(out_dir: Path, prefix: str = "train") -> list[dict]:
    """The samples of a shard set, in order, read with webdataset."""
    urls = expand_urls(str(out_dir / f"{prefix}.manifest.json"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def image_of(sample: dict) -> np.ndarray:
    ext = next(e for e in ("png", "jpg", "webp") if e in sample)
    return np.asarray(Image.open(io.BytesIO(sample[ext])))


@pytest.fixture
def photos(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, str]]]:
    return tmp_path / "photos", write_photos(tmp_path / "photos")


# -- make_shards ------------------------------------------------------------------------------------


def test_collect_items_recurses_sorts_and_reads_sidecars(photos):
    folder, written = photos
    (folder / "notes.txt").write_text("not a caption of anything")
    (folder / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(folder / ".hidden" / "skip.png")
    items = collect_items(folder)
    assert [item.source for item in items] == sorted(written)
    assert all(item.caption == written[item.source][1] for item in items)
    assert all(item.path == folder / item.source for item in items)


def test_png_round_trip_is_exact(photos, tmp_path):
    folder, written = photos
    result = make_shards(folder, tmp_path / "out", image_format="png", samples_per_shard=3)
    assert result["written"] == 5 and result["skipped"] == [] and result["uncaptioned"] == 0
    manifest = read_manifest(tmp_path / "out", "train")
    assert result["manifests"] == {"train": manifest}
    assert [s["samples"] for s in manifest["shards"]] == [3, 2] and manifest["total"] == 5

    samples = read_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(5)]
    for sample, source in zip(samples, sorted(written), strict=True):
        pixels, caption = written[source]
        assert sorted(k for k in sample if not k.startswith("__")) == ["json", "png", "txt"]
        np.testing.assert_array_equal(image_of(sample), pixels)
        assert sample["txt"].decode() == caption
        meta = json.loads(sample["json"])
        height, width = pixels.shape[:2]
        assert meta == {
            "key": sample["__key__"],
            "caption": caption,
            "width": width,
            "height": height,
            "original_width": width,
            "original_height": height,
            "source": source,
        }

    # and through the training pipeline
    dataset = ShardDataset(
        str(tmp_path / "out" / "train.manifest.json"), batch_size=8, shuffle=False, transform=ImageTransform(size=32)
    )
    (batch,) = list(dataset)
    assert batch["caption"] == [written[source][1] for source in sorted(written)]
    assert batch["image"].shape == (5, 3, 32, 32)


def test_jpeg_with_max_side(photos, tmp_path):
    folder, written = photos
    make_shards(folder, tmp_path / "out", image_format="jpg", quality=90, max_side=128)
    for sample, source in zip(read_samples(tmp_path / "out"), sorted(written), strict=True):
        original = Image.fromarray(written[source][0])
        decoded = image_of(sample)
        height, width = decoded.shape[:2]
        meta = json.loads(sample["json"])
        assert max(width, height) == 128 and (meta["width"], meta["height"]) == (width, height)
        assert (meta["original_width"], meta["original_height"]) == original.size
        assert abs(width / height - original.width / original.height) < 0.02
        reference = np.asarray(original.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))
        decoded_rgb = decoded if decoded.ndim == 3 else np.stack([decoded] * 3, axis=-1)
        assert np.abs(decoded_rgb.astype(int) - reference.astype(int)).mean() < 6  # JPEG loss only


def test_exif_orientation_and_transparency(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    photo = Image.fromarray(skdata.chelsea())  # 451 x 300
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated 90 degrees clockwise
    photo.save(folder / "rotated.jpg", exif=exif, quality=95)
    logo = Image.new("RGBA", (40, 30), (0, 0, 255, 255))
    logo.paste((0, 0, 0, 0), (0, 0, 20, 30))  # left half fully transparent
    logo.save(folder / "logo.png")
    make_shards(folder, tmp_path / "out", image_format="png")

    logo_sample, rotated = read_samples(tmp_path / "out")
    assert json.loads(rotated["json"])["original_width"] == 300 and image_of(rotated).shape[:2] == (451, 300)
    pixels = image_of(logo_sample)
    assert pixels.shape == (30, 40, 3)
    assert (pixels[:, :20] == 255).all() and (pixels[:, 20:] == [0, 0, 255]).all()


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_tables_with_extra_fields(kind, tmp_path, monkeypatch):
    table_dir = tmp_path / "meta"
    written = write_photos(table_dir / "images", captions=False)
    absolute = next(iter(written))
    rows = [
        {
            "file": str(table_dir / "images" / name) if name == absolute else f"images/{name}",
            "text": caption,
            "score": 0.25 * index,
            "license": "cc-by",
            "width": 1,  # replaced by the real width
        }
        for index, (name, (_, caption)) in enumerate(written.items())
    ]
    table = table_dir / f"table.{kind}"
    if kind == "csv":
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "jsonl":
        table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the table's folder, not the cwd

    result = make_shards(table, tmp_path / "out", caption_column="text", path_column="file", image_format="png")
    assert result["written"] == len(rows) and result["skipped"] == []
    samples = read_samples(tmp_path / "out")
    by_source = {row["file"]: row for row in rows}
    assert [json.loads(s["json"])["source"] for s in samples] == sorted(by_source)
    for sample in samples:
        meta = json.loads(sample["json"])
        row = by_source[meta["source"]]
        assert sample["txt"].decode() == row["text"] == meta["caption"]
        assert meta["license"] == "cc-by"
        assert float(meta["score"]) == row["score"]  # CSV cells stay text
        assert meta["width"] == image_of(sample).shape[1]
        assert "file" not in meta and "text" not in meta


def test_unreadable_images_are_reported_and_skipped(photos, tmp_path, caplog):
    folder, written = photos
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    png = (folder / "astronaut.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    result = make_shards(folder, tmp_path / "out", image_format="png")

    assert result["written"] == len(written)
    assert [s["path"] for s in result["skipped"]] == ["broken.jpg", "truncated.png"]
    assert all(s["reason"] for s in result["skipped"])
    assert "broken.jpg" in caplog.text and "truncated.png" in caplog.text
    # keys are positions in the sorted list of all images, so they do not shift around a bad file
    sources = sorted([*written, "broken.jpg", "truncated.png"])
    for sample in read_samples(tmp_path / "out"):
        assert sources[int(sample["__key__"])] == json.loads(sample["json"])["source"]


def test_missing_captions_are_empty_or_skipped(photos, tmp_path):
    folder, _ = photos
    (folder / "coffee.txt").unlink()
    result = make_shards(folder, tmp_path / "out", image_format="png")
    assert result["written"] == 5 and result["uncaptioned"] == 1
    coffee = next(s for s in read_samples(tmp_path / "out") if json.loads(s["json"])["source"] == "coffee.png")
    assert coffee["txt"] == b"" and json.loads(coffee["json"])["caption"] == ""

    result = make_shards(folder, tmp_path / "strict", image_format="png", require_caption=True)
    assert result["written"] == 4 and result["uncaptioned"] == 0
    assert [s["path"] for s in result["skipped"]] == ["coffee.png"] and "caption" in result["skipped"][0]["reason"]


def test_val_split_is_deterministic_and_disjoint(tmp_path):
    astronaut = skdata.astronaut()
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(astronaut[32 * i : 32 * i + 48, 32 * i : 32 * i + 48]).save(folder / f"tile{i:02d}.png")
        (folder / f"tile{i:02d}.txt").write_text(f"tile {i}")

    def split(out: str, seed: int) -> tuple[set[str], set[str]]:
        result = make_shards(folder, tmp_path / out, val_fraction=0.25, seed=seed, image_format="png")
        assert set(result["manifests"]) == {"train", "val"}
        sources = {
            prefix: {json.loads(s["json"])["source"] for s in read_samples(tmp_path / out, prefix)}
            for prefix in ("train", "val")
        }
        return sources["train"], sources["val"]

    train, val = split("a", seed=0)
    assert len(val) == 3 and len(train) == 9
    assert not train & val and train | val == {f"tile{i:02d}.png" for i in range(12)}
    assert split("b", seed=0) == (train, val)
    assert split("c", seed=1)[1] != val


def test_workers_give_the_same_shards(photos, tmp_path):
    folder, _ = photos
    make_shards(folder, tmp_path / "serial", image_format="png", samples_per_shard=2)
    make_shards(folder, tmp_path / "parallel", image_format="png", samples_per_shard=2, workers=2)
    assert read_manifest(tmp_path / "serial", "train") == read_manifest(tmp_path / "parallel", "train")

    def members(out: str) -> list[dict]:
        return [
            {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            for s in read_samples(tmp_path / out)
        ]

    assert members("serial") == members("parallel")


def test_existing_shards_need_overwrite(photos, tmp_path):
    folder, _ = photos
    make_shards(folder, tmp_path / "out", samples_per_shard=2)
    assert len(list((tmp_path / "out").glob("train-*.tar"))) == 3
    with pytest.raises(IngestError, match="--overwrite"):
        make_shards(folder, tmp_path / "out")
    make_shards(folder, tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").glob("train-*.tar")] == ["train-000000.tar"]


def test_bad_input_fails_clearly(photos, tmp_path):
    folder, _ = photos
    with pytest.raises(IngestError, match="does not exist"):
        make_shards(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "table.xlsx").write_bytes(b"")
    with pytest.raises(IngestError, match=r"'\.xlsx' is not supported"):
        make_shards(tmp_path / "table.xlsx", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no images found"):
        make_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "t.csv").write_text("image,caption\nastronaut.png,an astronaut\n")
    with pytest.raises(IngestError, match="--path-column"):
        make_shards(tmp_path / "t.csv", tmp_path / "out")
    (tmp_path / "u.jsonl").write_text('{"path": "https://example.com/a.jpg", "caption": "a"}\n')
    with pytest.raises(IngestError, match="URL"):
        make_shards(tmp_path / "u.jsonl", tmp_path / "out")
    with pytest.raises(IngestError, match="val_fraction"):
        make_shards(folder, tmp_path / "out", val_fraction=1.0)
    assert not (tmp_path / "out").exists()


def test_make_shards_cli(photos, tmp_path):
    folder, _ = photos
    command = [sys.executable, "tools/make_shards.py", str(folder), "--out", str(tmp_path / "out")]
    done = subprocess.run([*command, "--samples-per-shard", "2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote 5 samples" in done.stdout and "train.manifest.json" in done.stdout
    assert read_manifest(tmp_path / "out", "train")["total"] == 5

    missing = [sys.executable, "tools/make_shards.py", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]
    done = subprocess.run(missing, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


# -- inspect_shards ---------------------------------------------------------------------------------


def test_inspect_finds_corrupt_samples_and_truncated_shards(photos, tmp_path):
    folder, written = photos
    out = tmp_path / "out"
    make_shards(folder, out, image_format="png", samples_per_shard=2)  # shards of 2, 2, 1 samples
    good = (out / "train-000002.tar").read_bytes()
    # a shard with one good and four faulty samples, written by hand
    with tarfile.open(out / "train-000002.tar") as tar:
        png = next(tar.extractfile(m).read() for m in tar if m.name.endswith(".png"))
    with wds.TarWriter(str(out / "extra.tar")) as tar:
        tar.write({"__key__": "x0", "png": png, "txt": b"fine", "json": b"{}"})
        tar.write({"__key__": "x1", "jpg": b"garbage", "txt": b"broken image", "json": b"{}"})
        tar.write({"__key__": "x2", "png": png, "json": b"{}"})  # no caption
        tar.write({"__key__": "x3", "png": png, "txt": b"bad json", "json": b"{not json"})
        tar.write({"__key__": "x4", "txt": b"no image", "json": b"{}"})
    # train-000000.tar cut at the start of its second sample (reads cleanly: only the manifest tells),
    # train-000001.tar cut in the middle of an image (a read error)
    with tarfile.open(out / "train-000000.tar") as tar:
        second = next(m.offset for m in tar if m.name.startswith(f"{1:09d}."))
    for name, size in (("train-000000.tar", second), ("train-000001.tar", 40_000)):
        path = out / name
        path.write_bytes(path.read_bytes()[:size])

    summary = inspect_shards(f"{out}/train.manifest.json::{out}/extra.tar", captions=3, grid=tmp_path / "grid.png")
    shards = {Path(s["url"]).name: s for s in summary["shards"]}
    assert shards["train-000000.tar"] == {
        "url": str(out / "train-000000.tar"),
        "samples": 1,
        "expected": 2,
        "error": None,
    }
    assert "ReadError" in shards["train-000001.tar"]["error"]
    assert shards["train-000002.tar"] == {
        "url": str(out / "train-000002.tar"),
        "samples": 1,
        "expected": 1,
        "error": None,
    }
    assert shards["extra.tar"]["samples"] == 5 and shards["extra.tar"]["expected"] is None
    faults = summary["faults"]
    assert faults["shard_error"] == 1 and faults["short_shard"] == 1
    assert faults["broken_image"] == 1 and faults["bad_json"] == 1
    assert faults["missing_caption"] >= 1 and faults["missing_image"] >= 1
    assert {(p["reason"], p["key"]) for p in summary["problems"]} >= {
        ("broken_image", "x1"),
        ("missing_caption", "x2"),
        ("bad_json", "x3"),
        ("missing_image", "x4"),
    }
    assert summary["extensions"]["json,png,txt"] >= 3 and summary["extensions"]["jpg,json,txt"] == 1
    captions = [written[source][1] for source in sorted(written)]
    assert summary["captions"][0] == {"key": f"{0:09d}", "caption": captions[0]}
    assert len(summary["captions"]) == 3
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width == 2 * 160  # 4 valid samples: 2 x 2

    assert (out / "train-000002.tar").read_bytes() == good  # inspection reads, never writes


def test_inspect_cli(photos, tmp_path, capsys):
    folder, written = photos
    make_shards(folder, tmp_path / "out", image_format="png", samples_per_shard=2)
    main = runpy.run_path(str(REPO / "tools" / "inspect_shards.py"))["main"]

    assert main([f"{tmp_path}/out/train-{{000000..000002}}.tar", "--json", "--captions", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == summary["valid"] == 5 and summary["faults"] == {}
    assert summary["extensions"] == {"json,png,txt": 5} and len(summary["captions"]) == 1

    assert main([str(tmp_path / "out" / "train.manifest.json"), "--grid", str(tmp_path / "g.png")]) == 0
    text = capsys.readouterr().out
    assert "total: 5 samples in 3 shards, 5 valid" in text and "faults: none" in text
    assert written["astronaut.png"][1] in text and (tmp_path / "g.png").is_file()

    assert main([str(tmp_path / "nowhere.manifest.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
