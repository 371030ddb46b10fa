"""The streaming pipeline: epoch modes, rank/worker splitting, faults, pre-flight checks, sources."""

from __future__ import annotations

import functools
import http.server
import io
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import spawn_ranks, write_shards
from trainer.data import (
    DataStats,
    ImageTransform,
    SampleFilter,
    ShardDataset,
    ShardLoader,
    ShardWriter,
    expand_urls,
    resolve_sources,
)
from trainer.errors import ConfigError, MissingDependencyError, MissingFileError


def dataset(urls, **kwargs) -> ShardDataset:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("transform", ImageTransform(size=32))
    return ShardDataset(urls, **kwargs)


def keys_of(ds: ShardDataset, num_workers: int = 0) -> list[str]:
    return [key for batch in ShardLoader(ds, num_workers=num_workers) for key in batch["key"]]


def test_batches_are_collated_and_normalized(shards: Path) -> None:
    ds = dataset(str(shards / "train.manifest.json"), transform=ImageTransform(size=32, normalize="symmetric"))
    batch = next(iter(ShardLoader(ds)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["caption"][0].startswith("sample number ")
    assert batch["meta"][0]["index"] == int(batch["key"][0][len("train") :])
    assert set(batch["data_stats"]) == {"rank", "worker", "epoch", "counts", "position"}


def test_the_datamodule_moves_a_batchs_tensors_and_leaves_its_json_alone(shards: Path) -> None:
    from trainer.datamodule import ShardDataModule

    module = ShardDataModule(train={"urls": str(shards / "train.manifest.json")}, batch_size=4, num_workers=0)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    batch["extra"] = {"nested": [torch.ones(2)]}  # a value it does not know: Lightning's recursive move
    assert ShardDataset.HOST_ONLY.issubset(batch)  # every host-only name is one a batch has
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["image"].device.type == "meta" and moved["extra"]["nested"][0].device.type == "meta"
    assert all(moved[name] is batch[name] for name in ShardDataset.HOST_ONLY)  # not walked, not copied
    pair = module.transfer_batch_to_device((torch.zeros(2), ["x"]), torch.device("meta"), 0)
    assert pair[0].device.type == "meta" and pair[1] == ["x"]  # a batch that is not a dict goes Lightning's way


@pytest.mark.parametrize("shuffle", [True, False])
def test_exact_mode_two_ranks_two_workers_sees_every_sample_once(shards: Path, shuffle: bool) -> None:
    urls = str(shards / "train-{000000..000007}.tar")
    for epoch in range(2):
        seen: list[str] = []
        for rank in range(2):
            ds = dataset(urls, rank=rank, world_size=2, num_workers=2, shuffle=shuffle, shuffle_buffer=8, seed=3)
            loader = ShardLoader(ds, num_workers=2)
            loader.next_epoch = epoch
            seen += [key for batch in loader for key in batch["key"]]
        assert sorted(seen) == sorted(f"train{i:06d}" for i in range(40)), f"epoch {epoch}"


def test_exact_mode_shard_order_changes_per_epoch_but_is_reproducible(shards: Path) -> None:
    ds = dataset(str(shards / "train.manifest.json"), shuffle=True, seed=7)
    orders = [ds.shards_for(0, 1, epoch) for epoch in range(3)]
    assert orders[0] != orders[1] or orders[1] != orders[2]
    assert orders[0] == dataset(str(shards / "train.manifest.json"), shuffle=True, seed=7).shards_for(0, 1, 0)
    first = keys_of(ds)
    assert first == keys_of(dataset(str(shards / "train.manifest.json"), shuffle=True, seed=7))


def test_resampled_mode_yields_the_configured_epoch_length(shards: Path) -> None:
    urls = str(shards / "train.manifest.json")
    # 50 samples per epoch over 2 ranks at batch 4 -> 6 batches per rank, split over 2 workers
    for rank in range(2):
        ds = dataset(urls, mode="resampled", epoch_length=50, rank=rank, world_size=2, num_workers=2)
        assert len(ds) == 6
        batches = list(ShardLoader(ds, num_workers=2))
        assert len(batches) == 6 and all(len(b["key"]) == 4 for b in batches)


def test_resampled_mode_mixes_sources_by_weight(tmp_path: Path) -> None:
    write_shards(tmp_path / "a", "a", 20, 5)
    write_shards(tmp_path / "b", "b", 20, 5)
    spec = [
        {"urls": str(tmp_path / "a" / "a.manifest.json"), "weight": 3.0},
        {"urls": str(tmp_path / "b" / "b.manifest.json"), "weight": 1.0},
    ]
    ds = dataset(spec, mode="resampled", epoch_length=800, shuffle_buffer=1, batch_size=20)
    counts = Counter(key[0] for key in keys_of(ds))
    assert counts["a"] + counts["b"] == 800
    assert 0.68 < counts["a"] / 800 < 0.82  # 0.75 expected; binomial sd ~0.015


def corrupt_shard(path: Path) -> None:
    """A shard with a good sample, a broken JPEG, a sample without caption and one with bad json."""
    good = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(good, format="JPEG")
    members = {
        "ok.jpg": good.getvalue(),
        "ok.txt": b"a red square",
        "broken.jpg": b"\xff\xd8\xff\xe0 this is not a jpeg",
        "broken.txt": b"broken",
        "nocaption.jpg": good.getvalue(),
        "badjson.jpg": good.getvalue(),
        "badjson.txt": b"bad json",
        "badjson.json": b"{not json",
        "noimage.txt": b"caption without an image",
    }
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_faults_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corrupt_shard(tmp_path / "bad.tar")
    write_shards(tmp_path, "good", 6, 6)
    truncated = tmp_path / "truncated.tar"
    data = (tmp_path / "good-000000.tar").read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    (tmp_path / "garbage.tar").write_bytes(b"\x00\x01 not a tar at all" * 50)
    urls = [str(tmp_path / n) for n in ("bad.tar", "truncated.tar", "garbage.tar", "good-000000.tar")]
    ds = dataset(urls, batch_size=1, shuffle=False)
    with caplog.at_level("WARNING"):
        batches = list(ShardLoader(ds))
    keys = [b["key"][0] for b in batches]
    assert keys.count("ok") == 1 and Counter(keys)["good000005"] == 1
    assert not {"broken", "nocaption", "badjson", "noimage"} & set(keys)
    counts = batches[-1]["data_stats"]["counts"]
    assert counts["broken_image"] == 1
    assert counts["missing_caption"] == 1
    assert counts["bad_json"] == 1
    assert counts["missing_image"] >= 1
    assert counts["shard_error"] >= 2  # the truncated tar and the garbage file
    assert "truncated.tar" in caplog.text and "broken" in caplog.text
    # the counts reach the training side summed over workers
    stats = DataStats()
    stats.update(batches[-1]["data_stats"])
    assert stats.totals()["broken_image"] == 1


def test_missing_caption_can_be_allowed(tmp_path: Path) -> None:
    corrupt_shard(tmp_path / "bad.tar")
    ds = dataset(str(tmp_path / "bad.tar"), batch_size=1, shuffle=False, require_caption=False)
    assert "nocaption" in keys_of(ds)


def test_metadata_filters(shards: Path) -> None:
    urls = str(shards / "train.manifest.json")
    assert keys_of(dataset(urls, filters=SampleFilter(min_width=1000))) == []
    # the images are 56 x 48: aspect 1.17
    assert len(keys_of(dataset(urls, filters=SampleFilter(max_aspect=1.5)))) == 40
    assert keys_of(dataset(urls, filters=SampleFilter(max_aspect=1.1))) == []
    kept = keys_of(dataset(urls, filters=SampleFilter(max_caption_length=len("sample number 9"))))
    assert sorted(kept) == [f"train{i:06d}" for i in range(10)]


def test_caption_from_a_json_field(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "j", 10) as writer:
        writer.write("k0", Image.new("RGB", (32, 32)), None, {"text": "from json"})
    batch = next(iter(ShardLoader(dataset(str(tmp_path / "j-000000.tar"), caption_key="json:text"))))
    assert batch["caption"] == ["from json"]


def test_tokenizer_hook_runs_on_the_batch(shards: Path) -> None:
    ds = dataset(
        str(shards / "val.manifest.json"), tokenizer=lambda captions: torch.tensor([[len(c)] for c in captions])
    )
    batch = next(iter(ShardLoader(ds)))
    assert batch["tokens"].tolist() == [[len(c)] for c in batch["caption"]]


def test_random_crop_and_flip_are_seeded(shards: Path) -> None:
    transform = ImageTransform(size=24, crop="random", flip=True)
    a = next(iter(ShardLoader(dataset(str(shards / "val.manifest.json"), transform=transform, seed=1))))
    b = next(iter(ShardLoader(dataset(str(shards / "val.manifest.json"), transform=transform, seed=1))))
    c = next(iter(ShardLoader(dataset(str(shards / "val.manifest.json"), transform=transform, seed=2))))
    assert torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])


def test_transform_resizes_shorter_side_and_center_crops() -> None:
    # left half black, right half white, 200 x 100: after resize to 50 x 25 ... crop 25 x 25 is mid-grey split
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, 100:] = 255
    out = ImageTransform(size=25, normalize="none")(Image.fromarray(pixels))
    assert out.shape == (3, 25, 25)
    assert out[:, :, :10].max() < 0.05 and out[:, :, -10:].min() > 0.95


# -- pre-flight checks ---------------------------------------------------------------------------


def test_empty_url_list_fails_clearly() -> None:
    with pytest.raises(ConfigError, match="shard URL list is empty"):
        dataset([])


def test_missing_local_shard_fails_clearly(shards: Path) -> None:
    with pytest.raises(MissingFileError, match=r"1 of 9 local shards do not exist: .*train-000008\.tar"):
        dataset(str(shards / "train-{000000..000008}.tar"))


def test_too_few_shards_for_ranks_and_workers_fails_in_exact_mode(shards: Path) -> None:
    with pytest.raises(ConfigError, match=r"2 shards for 2 ranks x 2 workers.*mode=resampled"):
        dataset(str(shards / "val.manifest.json"), world_size=2, num_workers=2)
    # resampled mode has no such limit
    dataset(str(shards / "val.manifest.json"), world_size=2, num_workers=2, mode="resampled", epoch_length=64)


def test_bad_mode_and_missing_epoch_length(shards: Path) -> None:
    with pytest.raises(ConfigError, match="mode must be one of"):
        dataset(str(shards / "val.manifest.json"), mode="sometimes")
    with pytest.raises(ConfigError, match="needs epoch_length"):
        dataset(str(shards / "val.manifest.json"), mode="resampled")


def test_unknown_url_scheme_fails_clearly() -> None:
    with pytest.raises(ConfigError, match="fsspec knows no filesystem"):
        dataset("nosuchscheme://bucket/x.tar")


def test_fsspec_scheme_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    def not_installed(protocol, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "filesystem", not_installed)
    with pytest.raises(MissingDependencyError, match="pip install s3fs"):
        dataset("s3://bucket/x-{000..003}.tar")


# -- URL forms ----------------------------------------------------------------------------------


def test_expand_urls_forms(shards: Path) -> None:
    assert expand_urls("a-{00..02}.tar::b.tar") == ["a-00.tar", "a-01.tar", "a-02.tar", "b.tar"]
    assert expand_urls(["x.tar", "y-{1..2}.tar"]) == ["x.tar", "y-1.tar", "y-2.tar"]
    assert len(expand_urls(str(shards / "train.manifest.json"))) == 8
    sources = resolve_sources([{"urls": "a-{0..1}.tar", "weight": 2}, "b.tar"])
    assert [(s.urls, s.weight) for s in sources] == [(["a-0.tar", "a-1.tar"], 2.0), (["b.tar"], 1.0)]


def test_pipe_fsspec_and_file_urls_read_the_same_samples(shards: Path) -> None:
    import fsspec

    path = shards / "train-000000.tar"
    memory = fsspec.filesystem("memory")
    memory.pipe("/latentloom-test/train-000000.tar", path.read_bytes())
    expected = keys_of(dataset(str(path), shuffle=False))
    assert len(expected) == 5
    assert keys_of(dataset(f"pipe:cat {path}", shuffle=False)) == expected
    assert keys_of(dataset(f"file://{path}", shuffle=False)) == expected
    assert keys_of(dataset("memory://latentloom-test/train-000000.tar", shuffle=False)) == expected


def test_http_urls_stream_from_a_server(shards: Path) -> None:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/train-{{000000..000001}}.tar"
        assert sorted(keys_of(dataset(url, shuffle=False))) == [f"train{i:06d}" for i in range(10)]
    finally:
        server.shutdown()


def _iterate_uneven(rank: int, world_size: int, port: int, shard_dir: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # rank 0 reads shards of 30 samples, rank 1 shards of 5: without agreement rank 0 would go on alone
        urls = [str(Path(shard_dir) / "long-000000.tar"), str(Path(shard_dir) / "short-000000.tar")]
        ds = dataset(urls, rank=rank, world_size=2, shuffle=False)
        batches = [len(b["key"]) for b in ShardLoader(ds, even_ranks=True)]
        queue.put((rank, len(batches)))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_even_ranks_stop_together_when_shards_are_uneven(tmp_path: Path) -> None:

    write_shards(tmp_path, "long", 30, 30)  # read by rank 0 (no shuffle: shard i goes to rank i)
    write_shards(tmp_path, "short", 5, 5)  # read by rank 1
    results = spawn_ranks(_iterate_uneven, tmp_path, timeout=120)
    # rank 1 has 5 samples = 2 batches of 4 (drop_last off: 4 + 1); rank 0 stops after as many
    assert results == {0: 2, 1: 2}


def test_resize_size_crops_patches_at_higher_resolution() -> None:
    pixels = np.zeros((100, 100, 3), np.uint8)
    pixels[:50] = 255  # top half white
    patch = ImageTransform(size=20, resize_size=100, normalize="none")(Image.fromarray(pixels))
    assert patch.shape == (3, 20, 20)
    # a 20 px center patch of the 100 px image straddles the edge sharply: rows 40..59
    assert patch[:, :10].min() > 0.95 and patch[:, 10:].max() < 0.05
    with pytest.raises(ConfigError, match="resize_size"):
        ImageTransform(size=64, resize_size=32)
