"""The fine-tuning recipes: a folder of real photos (scikit-image's) with captions written here becomes shards
on first use, cached and reused, and finetune_ldm / finetune_clip / finetune_autoencoder train on it from tiny
base weights made here, through the entry point's own train() with the README's overrides."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tiny import AE as TINY_VAE
from trainer.checkpoints import export_vae, read_weights
from trainer.data.folders import LOCK, STAMP, cache_dir, ensure_folder_shards
from trainer.data.photos import load_photo
from trainer.data.shards import read_manifest
from trainer.errors import ConfigError, MissingFileError
from trainer.models.autoencoder import AutoencoderKL
from trainer.models.clip import build_clip, export_clip
from trainer.train import CONFIG_DIR, train

# photo name -> caption; a few in a subfolder, as a user's folder would have
PHOTOS = {
    "astronaut": "a portrait of an astronaut in a white suit",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a ginger cat looking to the side",
    "rocket": "a rocket on its launch pad",
    "camera": "a man with a camera on a tripod",
    "coins": "old coins on a dark background",
    "moon": "the surface of the moon",
    "brick": "a brick wall",
    "grass": "a patch of grass",
    "clock": "a clock on a wall",
}
SUBFOLDER = {"chelsea", "coffee", "rocket"}
# The tiny stand-ins for released weights, as overrides of the recipes' models
TINY_CLIP = [
    "model=clip/tiny",
    "model.config.embed_dim=32",
    "model.config.vision_cfg.layers=1",
    "model.config.vision_cfg.width=64",
    "model.config.text_cfg.layers=1",
    "model.config.text_cfg.width=64",
    "model.config.text_cfg.heads=2",
    "model.config.text_cfg.context_length=16",
]
TINY_UNET = [
    "model=unet/tiny",
    "model.model_channels=32",
    "model.num_head_channels=16",
    "model.context_dim=64",
    "model.attention_resolutions=[2]",
]
# a few steps on CPU, small images: 64 px shards, 32 px crops
FAST = [
    "debug=fast",
    "data.image_size=32",
    "data.batch_size=4",
    "data.ingest.max_side=64",
    "data.ingest.val_fraction=0.2",
]


def hydra_dict(value: dict) -> str:
    """A dict as a Hydra override value: {a:1,b:[1,2]}."""
    return json.dumps(value).replace('"', "").replace(" ", "")


def compose_run(root: Path, run: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.root_dir={root}", f"paths.output_dir={root / run}"])


def fit(root: Path, run: str, overrides: list[str]) -> tuple[dict, Path]:
    """``python -m trainer.train OVERRIDES`` in this process: the same config and train()."""
    metrics = train(compose_run(root, run, overrides))
    assert math.isfinite(metrics["train/loss"]), metrics
    return metrics, root / run


def write_folder(folder: Path, names=PHOTOS, max_side: int = 96) -> Path:
    for name in names:
        image = load_photo(name)
        image.thumbnail((max_side, max_side))
        path = folder / ("animals_and_things" if name in SUBFOLDER else "") / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        path.with_suffix(".txt").write_text(PHOTOS[name] + "\n")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("photos") / "my photos")


def shards_of(root: Path, images: Path) -> Path:
    return cache_dir(images, root / "data" / "folders")


def tar_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.tar")}


# -- the folder -> shards cache --------------------------------------------------------------------------------


def test_a_folder_becomes_shards_once_and_is_rebuilt_when_it_changes(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainer")
    images = write_folder(tmp_path / "pics", ["astronaut", "coffee", "chelsea", "coins"], max_side=48)
    out = cache_dir(images, tmp_path / "cache")
    assert out.parent == tmp_path / "cache" and out.name.startswith("pics-")
    assert cache_dir(tmp_path / "elsewhere" / "pics", tmp_path / "cache") != out  # same name, other folder
    options = {"val_fraction": 0.25, "max_side": 32}
    ensure_folder_shards(images, out, **options)
    assert read_manifest(out, "train")["total"] == 3 and read_manifest(out, "val")["total"] == 1
    assert json.loads((out / STAMP).read_text())["images"] == 4
    first = tar_times(out)

    caplog.clear()
    ensure_folder_shards(images, out, **options)
    assert tar_times(out) == first and "reusing the shards" in caplog.text

    caplog.clear()
    (images / "coins.txt").write_text("a handful of coins")  # a caption edited
    ensure_folder_shards(images, out, **options)
    assert "the images or captions changed" in caplog.text
    captions = json.loads((out / STAMP).read_text())
    assert captions["written"] == {"train": 3, "val": 1}

    caplog.clear()
    ensure_folder_shards(images, out, **{**options, "val_fraction": 0.0})  # other options: rebuilt, val gone
    assert "the ingest options changed" in caplog.text
    assert not (out / "val.manifest.json").exists() and read_manifest(out, "train")["total"] == 4


def test_processes_sharing_a_folder_build_its_shards_once(tmp_path: Path) -> None:
    """Every node's first rank prepares the data; on a shared filesystem they meet in one cache folder."""
    images = write_folder(tmp_path / "pics", ["astronaut", "coffee", "chelsea", "coins"], max_side=48)
    out = cache_dir(images, tmp_path / "cache")
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
        "from trainer.data.folders import ensure_folder_shards;"
        f"ensure_folder_shards({str(images)!r}, {str(out)!r}, val_fraction=0.25)"
    )
    out.mkdir(parents=True)
    with open(out / LOCK, "a") as held:  # another process is building: the newcomer waits for it
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for line in waiting.stdout:  # until it says it waits (it blocks there, so this loop ends)
            if "another process is writing the shards" in line:
                break
        assert waiting.poll() is None and not (out / STAMP).exists()
    assert waiting.wait(timeout=120) == 0
    assert "writing the 4 images" in waiting.stdout.read()
    (out / STAMP).unlink()  # as if never built: two start at once, one writes, the other reuses
    both = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [process.communicate(timeout=120)[0] for process in both]
    assert [process.returncode for process in both] == [0, 0]
    assert sum("writing the 4 images" in log for log in logs) == 1
    assert sum("reusing the shards" in log for log in logs) == 1


def test_waiting_for_the_lock_is_reported_until_it_is_free(tmp_path: Path, caplog) -> None:
    import threading

    from trainer.data.folders import _wait_for_lock

    caplog.set_level(logging.INFO, logger="trainer")
    lock = tmp_path / LOCK
    with open(lock, "a") as held, open(lock, "a") as waiting:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(target=_wait_for_lock, args=(waiting, "data.images", tmp_path, 0.3))
        waiter.start()
        time.sleep(1.2)
        assert waiter.is_alive()
        fcntl.flock(held, fcntl.LOCK_UN)
        waiter.join(timeout=10)
        assert not waiter.is_alive()
    reports = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert len(reports) >= 3 and "min so far" in reports[-1]


def test_a_cache_folder_whose_lock_cannot_be_opened_is_still_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """A cache on a read-only mount, or another user's: reading it needs no lock."""
    from trainer.data import folders

    images = write_folder(tmp_path / "pics", ["astronaut", "coffee"], max_side=48)
    out = cache_dir(images, tmp_path / "cache")
    ensure_folder_shards(images, out, val_fraction=0.5)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(folders, "open", refuse, raising=False)
    caplog.set_level(logging.INFO, logger="trainer")
    assert ensure_folder_shards(images, out, val_fraction=0.5) == out
    assert "cannot open the lock file" in caplog.text and "reusing the shards" in caplog.text


def test_inputs_that_cannot_be_trained_on_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"data.images=.*nope does not exist; give a folder of images"):
        ensure_folder_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match=r"no images in .*empty"):
        ensure_folder_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ConfigError, match="is a file but not a caption table"):
        ensure_folder_shards(tmp_path / "list.txt", tmp_path / "out")

    images = write_folder(tmp_path / "pics", ["astronaut", "coffee", "coins"], max_side=32)
    (images / "coins.txt").unlink()
    (images / "astronaut.txt").write_text("  \n")  # an empty caption is no caption
    with pytest.raises(ConfigError, match=r"2 of 3 images .* have no caption \(astronaut.png, coins.png\); write"):
        ensure_folder_shards(images, tmp_path / "out", val_fraction=0)
    assert not (tmp_path / "out" / "train.manifest.json").exists()
    ensure_folder_shards(images, tmp_path / "out", val_fraction=0, missing_captions="skip")
    assert read_manifest(tmp_path / "out", "train")["total"] == 1
    ensure_folder_shards(images, tmp_path / "out", val_fraction=0, missing_captions="empty")
    assert read_manifest(tmp_path / "out", "train")["total"] == 3


def test_the_entry_point_reports_a_bad_folder_as_a_user_error(tmp_path: Path) -> None:
    """Raised in the datamodule's constructor (wrapped by Hydra) or in prepare_data (inside fit): either way
    main() finds the UserError and prints it as one line."""
    from trainer.cli_errors import user_error

    common = ["experiment=finetune_autoencoder", "base=null", "model=autoencoder/tiny_f4", *FAST]
    with pytest.raises(Exception) as raised:
        train(compose_run(tmp_path, "a", [*common, f"data.images={tmp_path / 'nope'}"]))
    assert isinstance(user_error(raised.value), MissingFileError)
    images = write_folder(tmp_path / "pics", ["astronaut", "coins"], max_side=32)
    (images / "coins.txt").unlink()
    with pytest.raises(ConfigError, match=r"1 of 2 images .* no caption \(coins.png\)"):
        train(compose_run(tmp_path, "b", [*common, f"data.images={images}", "data.ingest.missing_captions=error"]))


# -- the recipes, end to end -----------------------------------------------------------------------------------


@pytest.mark.slow  # 15 s on 2 idle CPU cores, 40 s on busy ones: two runs, one with validation sampling
def test_finetune_ldm_on_a_folder_from_an_ldm_export(photos: Path, tmp_path: Path, caplog) -> None:
    """README: python -m trainer.train experiment=finetune_ldm data.images=... base=... text_encoder=..."""
    from trainer.tasks.latent_diffusion import LatentDiffusionTask

    command = ["experiment=finetune_ldm", f"data.images={photos}"]
    tiny = [
        *TINY_UNET,
        f"task.autoencoder.config={hydra_dict(TINY_VAE)}",
        "task.autoencoder.scale_factor=null",  # the one our export stores
        "task.validation.steps=2",
        "task.validation.prompts=[a cat]",
        "task.validation.loss_buckets=2",
        *FAST,
        "data.image_size=16",  # 8 x 8 latents
    ]
    # the base: our tiny CLIP's export folder as the text encoder, and an LDM export (UNet + VAE, SD layout)
    cfg = compose_run(tmp_path, "unused", [*command, "base=x", "text_encoder=x", *TINY_CLIP, *FAST])
    torch.manual_seed(0)
    clip, _ = build_clip("finetune-test-clip", OmegaConf.to_container(cfg.model.config, resolve=True))
    export_clip(clip, "finetune-test-clip", OmegaConf.to_container(cfg.model.config, resolve=True), tmp_path / "clip")
    unet = OmegaConf.to_container(
        compose_run(tmp_path, "unused", [*command, "base=x", "text_encoder=x", *tiny]).model, resolve=True
    )
    base = LatentDiffusionTask(
        unet, {"config": TINY_VAE, "scale_factor": 0.5}, {"source": str(tmp_path / "clip")}, ema_decay=None
    ).export(tmp_path / "base" / "ldm.safetensors")
    command += [f"base={base}", f"text_encoder={tmp_path / 'clip'}"]

    caplog.set_level(logging.INFO, logger="trainer")
    _, run = fit(tmp_path, "run1", [*command, *tiny])
    shards = shards_of(tmp_path, photos)
    assert read_manifest(shards, "train")["total"] == 8 and read_manifest(shards, "val")["total"] == 2
    assert "writing the 10 images" in caplog.text
    before, after = read_weights(base), read_weights(run / "export" / "ldm.safetensors")
    assert after[1]["scale_factor"] == "0.5"  # the VAE and its scale came from base
    assert torch.equal(
        before[0]["first_stage_model.decoder.conv_out.weight"], after[0]["first_stage_model.decoder.conv_out.weight"]
    )
    unet_keys = [k for k in before[0] if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(before[0][k], after[0][k]) for k in unet_keys)  # the UNet trained

    # a second run reuses the shards
    times = tar_times(shards)
    caplog.clear()
    fit(tmp_path, "run2", [*command, *tiny, "trainer.max_steps=1", "trainer.limit_val_batches=0"])
    assert tar_times(shards) == times and "reusing the shards" in caplog.text and "writing the" not in caplog.text


def test_finetune_clip_on_a_caption_table_with_a_locked_image_tower(photos: Path, tmp_path: Path) -> None:
    """README: python -m trainer.train experiment=finetune_clip data.images=captions.csv
    data.ingest.caption_column=text base=... task.lock_image=true"""
    table = tmp_path / "captions.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text", "photographer"])
        for path in sorted(photos.rglob("*.png")):  # paths relative to the table's folder
            writer.writerow([Path(os.path.relpath(path, tmp_path)).as_posix(), PHOTOS[path.stem], "skimage"])
    command = [
        "experiment=finetune_clip",
        f"data.images={table}",
        "data.ingest.caption_column=text",
        "task.lock_image=true",
    ]
    cfg = compose_run(tmp_path, "unused", [*command, "base=x", *TINY_CLIP, *FAST])
    config = OmegaConf.to_container(cfg.model.config, resolve=True)
    torch.manual_seed(0)
    clip, _ = build_clip(cfg.model.name, config)
    base = export_clip(clip, cfg.model.name, config, tmp_path / "base" / "clip")

    _, run = fit(tmp_path, "run", [*command, f"base={base}", *TINY_CLIP, *FAST])
    shards = shards_of(tmp_path, table)
    assert read_manifest(shards, "train")["total"] + read_manifest(shards, "val")["total"] == 10
    before = read_weights(base / "open_clip_model.safetensors")[0]
    after = read_weights(run / "export" / "clip" / "open_clip_model.safetensors")[0]
    visual = [k for k in before if k.startswith("visual.")]
    text = [k for k in before if k.startswith("transformer.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)  # locked
    assert any(not torch.equal(before[k], after[k]) for k in text)


def test_finetune_autoencoder_trains_the_decoder_only(photos: Path, tmp_path: Path) -> None:
    """README: python -m trainer.train experiment=finetune_autoencoder data.images=... base=..."""
    command = ["experiment=finetune_autoencoder", f"data.images={photos}"]
    tiny = ["model=autoencoder/tiny_f4", "task.optimizer.lr=1e-3", *FAST]
    cfg = compose_run(tmp_path, "unused", [*command, "base=x", *tiny])
    config = OmegaConf.to_container(cfg.model, resolve=True)
    torch.manual_seed(0)
    base = export_vae(AutoencoderKL.from_config(config), tmp_path / "base" / "vae.safetensors", 0.7, config)

    _, run = fit(tmp_path, "run", [*command, f"base={base}", *tiny])
    before, (after, metadata) = read_weights(base)[0], read_weights(run / "export" / "autoencoder.safetensors")
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the latents stay valid
    decoder = [k for k in before if k.startswith("decoder.")]
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    assert float(metadata["scale_factor"]) == pytest.approx(0.7)  # kept, not re-measured
