"""Hostile data: shards that yield nothing, too many skipped samples, captions that are not UTF-8, huge images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from conftest import spawn_ranks, training_cli, write_shards
from trainer.data import Buckets, ImageTransform, SampleFilter, ShardDataset, ShardLoader
from trainer.errors import DataError

TESTS = str(Path(__file__).resolve().parent)


def dataset(urls, **kwargs) -> ShardDataset:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("transform", ImageTransform(size=32))
    return ShardDataset(urls, **kwargs)


def read_all(ds: ShardDataset, num_workers: int = 0) -> list[dict]:
    return list(ShardLoader(ds, num_workers=num_workers))


def write_tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def jpeg(size: tuple[int, int] = (40, 40), colour=(200, 10, 10)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


def mixed_shards(folder: Path, broken: int, good: int, shards: int = 4) -> list[str]:
    """``broken`` samples whose JPEG cannot be decoded and ``good`` ones, dealt over ``shards`` tars."""
    samples = [(f"bad{i:03d}", b"\xff\xd8\xff\xe0 not a jpeg") for i in range(broken)]
    samples += [(f"ok{i:03d}", jpeg()) for i in range(good)]
    urls = []
    for s in range(shards):
        members = {}
        for key, data in samples[s::shards]:
            members[f"{key}.jpg"], members[f"{key}.txt"] = data, f"caption of {key}".encode()
        urls.append(write_tar(folder / f"mixed-{s}.tar", members))
    return urls


# -- an epoch that yields nothing ------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_wrong_caption_key_stops_the_epoch_naming_the_reason(shards: Path, num_workers: int) -> None:
    ds = dataset(str(shards / "train.manifest.json"), caption_key="json:text", num_workers=num_workers)
    with pytest.raises(DataError) as caught:
        read_all(ds, num_workers)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("data: epoch 0 of rank 0 yielded no sample: 40 of 40 samples skipped")
    assert "missing_caption 40" in message and "in 8 shards" in message and "data.caption_key" in message


def test_shards_of_captions_alone_or_of_broken_images_say_so(tmp_path: Path) -> None:
    only_text = [write_tar(tmp_path / f"txt-{i}.tar", {f"k{i}{j}.txt": b"a caption" for j in range(3)}) for i in (0, 1)]
    with pytest.raises(DataError, match=r"missing_image 6.*image member"):
        read_all(dataset(only_text))
    with pytest.raises(DataError, match=r"broken_image 8"):
        read_all(dataset(mixed_shards(tmp_path, broken=8, good=0)))


def test_empty_and_unreadable_shards_say_so(tmp_path: Path) -> None:
    empty = write_tar(tmp_path / "empty.tar", {})
    (tmp_path / "garbage.tar").write_bytes(b"\x00\x01 not a tar at all" * 50)
    with pytest.raises(DataError, match=r"yielded no sample: its 2 shards \(1 unreadable\) held none; check data.urls"):
        read_all(dataset([empty, str(tmp_path / "garbage.tar")]))


def test_too_few_samples_for_one_batch_with_drop_last_say_so(shards: Path) -> None:
    ds = dataset(str(shards / "val.manifest.json"), batch_size=50, drop_last=True)
    with pytest.raises(DataError, match=r"yielded no batch: 12 samples passed.*batch_size"):
        read_all(ds)


def test_filters_that_reject_everything_fail_where_a_run_would_loop(shards: Path, caplog) -> None:
    ds = dataset(str(shards / "train.manifest.json"), filters=SampleFilter(min_width=1000))
    with pytest.raises(DataError, match=r"filtered 40\) in 8 shards; data.filters reject every sample"):
        list(ShardLoader(ds, allow_filtered_out=False))  # as the data module makes its loaders
    assert read_all(ds) == []  # the library's default: deliberate, so a warning
    assert "filtered 40" in caplog.text


def test_the_data_module_refuses_an_epoch_that_filters_empty(shards: Path) -> None:
    from trainer.datamodule import ShardDataModule

    module = ShardDataModule(
        {"urls": str(shards / "train.manifest.json")},
        {"urls": str(shards / "val.manifest.json")},
        batch_size=4,
        num_workers=0,
        image_size=32,
        filters={"min_width": 1000},
        max_skipped_fraction=0.5,
        max_image_pixels=10**6,
    )
    module.setup("fit")
    assert (module.train_set.max_skipped_fraction, module.val_set.max_image_pixels) == (0.5, 10**6)
    for loader in (module.train_dataloader(), module.val_dataloader()):
        with pytest.raises(DataError, match="data.filters reject every sample"):
            list(loader)


def test_validation_that_yields_nothing_fails_as_well(shards: Path) -> None:
    ds = dataset(str(shards / "val.manifest.json"), caption_key="json:text", shuffle=False, name="data.val")
    with pytest.raises(DataError, match=r"^data.val: epoch 0 of rank 0 yielded no sample"):
        read_all(ds)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_mode_with_nothing_to_keep_terminates(shards: Path, num_workers: int) -> None:
    ds = dataset(
        str(shards / "train.manifest.json"),
        mode="resampled",
        epoch_length=64,
        caption_key="json:text",
        num_workers=num_workers,
        max_skipped_fraction=None,  # not the threshold: a stream that keeps nothing gives up on its own
    )
    with pytest.raises(DataError, match=r"yielded no sample.*missing_caption"):
        read_all(ds, num_workers)


@pytest.mark.timeout(60)
def test_resampled_mode_without_a_single_sample_terminates(tmp_path: Path) -> None:
    empty = [write_tar(tmp_path / f"empty-{i}.tar", {}) for i in range(2)]
    with pytest.raises(DataError, match=r"yielded no sample"):
        read_all(dataset(empty, mode="resampled", epoch_length=64))


# -- the skipped fraction ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mostly_broken_images_stop_the_run_and_a_few_do_not(tmp_path: Path, num_workers: int) -> None:
    (tmp_path / "bad").mkdir()
    bad = mixed_shards(tmp_path / "bad", broken=38, good=2)
    with pytest.raises(DataError) as caught:
        read_all(dataset(bad, batch_size=1, num_workers=num_workers), num_workers)
    message = str(caught.value)
    assert "95% of 40 samples" in message and "broken_image 38" in message
    assert "data.max_skipped_fraction=0.9" in message and "\n" not in message
    # 5 % broken trains on, and so does 95 % with the check off
    (tmp_path / "few").mkdir()
    few = mixed_shards(tmp_path / "few", broken=2, good=38)
    batches = read_all(dataset(few, batch_size=1, num_workers=num_workers), num_workers)
    assert len(batches) == 38
    assert len(read_all(dataset(bad, batch_size=1, max_skipped_fraction=None, num_workers=num_workers))) == 2


def test_deliberate_filtering_does_not_count_toward_the_fraction(shards: Path) -> None:
    kept = dataset(str(shards / "train.manifest.json"), filters=SampleFilter(max_caption_length=len("sample number 1")))
    assert sum(len(b["key"]) for b in read_all(kept)) == 10  # 30 of 40 filtered out: 75 %, yet no error


@pytest.mark.timeout(60)
def test_resampled_mode_judges_the_fraction_while_streaming(tmp_path: Path) -> None:
    urls = mixed_shards(tmp_path, broken=38, good=2)
    ds = dataset(urls, mode="resampled", epoch_length=10_000, batch_size=10)
    with pytest.raises(DataError, match=r"% of \d+ samples read by rank 0 in epoch 0 were skipped"):
        read_all(ds)


def test_invalid_fraction_is_refused(shards: Path) -> None:
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="max_skipped_fraction"):
        dataset(str(shards / "val.manifest.json"), max_skipped_fraction=1.5)


# -- captions that are not UTF-8 -----------------------------------------------------------------------------


def test_a_caption_that_is_not_utf8_is_skipped_counted_and_logged(tmp_path: Path, caplog) -> None:
    members = {"latin.jpg": jpeg(), "latin.txt": b"a caf\xe9", "good.jpg": jpeg(), "good.txt": "a caf\u00e9".encode()}
    url = write_tar(tmp_path / "captions.tar", members)
    with caplog.at_level("WARNING"):
        batches = read_all(dataset(url, batch_size=1, shuffle=False, max_skipped_fraction=None))
    assert [b["caption"] for b in batches] == [["a caf\u00e9"]]
    assert batches[-1]["data_stats"]["counts"] == {"bad_caption": 1}
    assert "bad_caption" in caplog.text and "captions.tar" in caplog.text and "key=latin" in caplog.text


# -- huge images ---------------------------------------------------------------------------------------------


def png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("1", size, 1).save(out, format="PNG")  # one colour: a 12000 x 12000 PNG is a few KB
    return out.getvalue()


@pytest.fixture
def decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The size of every image whose pixels are decoded."""
    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def recording_load(self):
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return sizes


@pytest.mark.parametrize("bucketed", [False, True])
def test_a_huge_png_is_refused_from_its_header(tmp_path: Path, decoded_sizes: list, bucketed: bool) -> None:
    huge = png((12000, 12000))
    assert len(huge) < 100_000
    url = write_tar(tmp_path / "huge.tar", {"huge.png": huge, "huge.txt": b"huge", "ok.jpg": jpeg(), "ok.txt": b"ok"})
    buckets = {"sizes": [[32, 32]]} if bucketed else None
    batches = read_all(dataset(url, batch_size=1, shuffle=False, max_skipped_fraction=None, buckets=buckets))
    assert [b["key"] for b in batches] == [["ok"]]
    assert batches[-1]["data_stats"]["counts"] == {"too_large": 1}
    assert all(w * h < 1_000_000 for w, h in decoded_sizes)  # the huge one never decoded


@pytest.mark.parametrize("bucketed", [False, True])
def test_a_large_jpeg_within_the_limit_after_draft_mode_is_kept(tmp_path: Path, bucketed: bool) -> None:
    # 1600 x 1600 = 2.56 MP is above a limit of 1 MP, but decodes at 1/8 (200 x 200) for 32 px crops
    members = {"png.png": png((1600, 1600)), "png.txt": b"png", "big.jpg": jpeg((1600, 1600)), "big.txt": b"big"}
    url = write_tar(tmp_path / "big.tar", members)
    buckets = Buckets.from_config({"sizes": [[32, 32]]}) if bucketed else None
    ds = dataset(
        url, batch_size=1, shuffle=False, max_image_pixels=1_000_000, max_skipped_fraction=None, buckets=buckets
    )
    batches = read_all(ds)
    assert [b["key"] for b in batches] == [["big"]]
    assert batches[-1]["data_stats"]["counts"] == {"too_large": 1}  # the PNG has no draft mode
    no_limit = dataset(url, batch_size=1, shuffle=False, max_image_pixels=None, buckets=buckets)
    assert sorted(k for b in read_all(no_limit) for k in b["key"]) == ["big", "png"]


# -- the stream the consumer sees ----------------------------------------------------------------------------


def test_stats_items_never_reach_the_consumer_nor_a_direct_iteration(tmp_path: Path) -> None:
    write_shards(tmp_path, "train", 44, 5)  # 9 shards: the workers' streams have different lengths
    ds = dataset(str(tmp_path / "train.manifest.json"), num_workers=2, shuffle=False)
    for batches in (read_all(ds, 2), list(ds)):
        assert all("image" in b and len(b["key"]) > 0 for b in batches)
        assert sorted(k for b in batches for k in b["key"]) == [f"train{i:06d}" for i in range(44)]


def test_the_loader_length_raises_no_warning_about_the_stats_items(shards: Path, recwarn) -> None:
    ds = dataset(str(shards / "train.manifest.json"), mode="resampled", epoch_length=32, num_workers=2)
    loader = ShardLoader(ds, num_workers=2)
    assert len(loader) == 8
    assert len(list(loader)) == 8
    assert not [w for w in recwarn if "Length of IterableDataset" in str(w.message)]


def _iterate_one_bad_rank(rank: int, world_size: int, port: int, shard_dir: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # no shuffle: rank 0 reads the good shard, rank 1 the one without images
        urls = [str(Path(shard_dir) / "good-000000.tar"), str(Path(shard_dir) / "text.tar")]
        ds = dataset(urls, rank=rank, world_size=2, shuffle=False)
        try:
            list(ShardLoader(ds, even_ranks=True))
            queue.put((rank, "no error"))
        except DataError as error:
            queue.put((rank, str(error)))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_rank_whose_data_yields_nothing_stops_every_rank(tmp_path: Path) -> None:

    write_shards(tmp_path, "good", 12, 12)
    write_tar(tmp_path / "text.tar", {f"k{j}.txt": b"a caption" for j in range(5)})
    results = spawn_ranks(_iterate_one_bad_rank, tmp_path, timeout=100)
    assert results[1].startswith("data: epoch 0 of rank 1 yielded no sample") and "missing_image 5" in results[1]
    assert results[0].startswith("data: rank 1 stopped the epoch:"), results[0]


# -- the entry point -----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_the_cli_stops_at_once_with_one_line_when_the_caption_key_is_wrong(tmp_path: Path, shards: Path) -> None:
    run_dir = tmp_path / "outputs" / "run"
    result = training_cli(run_dir, shards, "shapes_clip", "data.caption_key=json:nope", "data.batch_size=8")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.train: epoch 0 of rank 0 yielded no sample: 40 of 40 samples skipped"), last
    assert "missing_caption 40" in last and "data.caption_key" in last
    assert not (run_dir.parent / "latest").exists()
    assert not list(run_dir.rglob("*.safetensors"))


# -- exact resume with the stats items ----------------------------------------------------------------------


def _take(loader: ShardLoader, stop_after: int | None = None) -> list[list[str]]:
    keys = []
    for batch in loader:
        loader.mark_consumed(batch)
        keys.append(batch["key"])
        if len(keys) == stop_after:
            break
    return keys


@pytest.mark.parametrize("stop_after", [2, 4, 7])
def test_resume_is_exact_after_a_worker_has_run_out(tmp_path: Path, stop_after: int) -> None:
    """Three workers of 1, 5 and 5 batches: once the first has run out, the round robin goes on over the other
    two, so a resumed loader starts with the worker after the one of the last batch taken (not consumed % 3)."""
    write_shards(tmp_path, "a", 4, 4)
    write_shards(tmp_path, "b", 20, 20)
    write_shards(tmp_path, "c", 20, 20)
    urls = [str(tmp_path / f"{p}-000000.tar") for p in "abc"]

    def loader() -> ShardLoader:
        return ShardLoader(dataset(urls, shuffle=False, num_workers=3), num_workers=3)

    uninterrupted = _take(loader())
    assert len(uninterrupted) == 11
    first = loader()
    head = _take(first, stop_after)
    second = loader()
    second.load_state_dict(first.state_dict())
    assert head + _take(second) == uninterrupted


def test_a_run_resumed_after_the_last_batch_of_an_epoch_goes_on_with_the_next(shards: Path) -> None:
    def loader() -> ShardLoader:
        return ShardLoader(dataset(str(shards / "train.manifest.json"), num_workers=2), num_workers=2)

    first = loader()
    epoch0 = _take(first)
    assert len(epoch0) == 10
    second = loader()
    second.load_state_dict(first.state_dict())
    assert _take(second) == []  # the rest of epoch 0: nothing, and no error
    epoch1 = _take(second)
    assert sorted(k for b in epoch1 for k in b) == sorted(k for b in epoch0 for k in b) and epoch1 != epoch0
