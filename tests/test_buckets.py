"""Aspect-ratio buckets: generation, assignment, resize-crop, the bucketed streaming pipeline (exact mode, resume),
the models and tasks on non-square images, and sampling at any width and height."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from test_resume import take
from torch import nn

from conftest import REPO
from tiny import AE as TINY_AE
from trainer.data import Buckets, ImageTransform, ShardDataset, ShardLoader, ShardWriter, generate_buckets
from trainer.data.buckets import resize_and_crop
from trainer.datamodule import ShardDataModule
from trainer.errors import ConfigError

# Sources of mixed shapes, all within the buckets' aspect range (1 / 2.5 .. 2.5).
SOURCE_SIZES = [(64, 32), (32, 64), (48, 48), (60, 40), (40, 60), (75, 30), (30, 75), (50, 50), (45, 60), (56, 40)]
# ~48 x 48 px, sides multiples of 8: 32x72, 40x56, 48x48, 56x40, 72x32
BUCKETS = {"max_area": 2304, "step": 8, "max_aspect": 2.5}


def write_mixed(out_dir: Path, prefix: str = "train", n: int = 40, per_shard: int = 5, seed: int = 0) -> dict:
    """``n`` random-colour images of the sizes above in shards of ``per_shard``; returns {key: (width, height)}."""
    rng = np.random.default_rng(seed)
    sizes = {}
    with ShardWriter(out_dir, prefix, samples_per_shard=per_shard) as writer:
        for i in range(n):
            width, height = SOURCE_SIZES[int(rng.integers(len(SOURCE_SIZES)))]
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            key = f"{prefix}{i:06d}"
            writer.write(key, Image.fromarray(pixels), f"sample number {i}", {"index": i})
            sizes[key] = (width, height)
    return sizes


def bucketed(urls, **kwargs) -> ShardDataset:
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("transform", ImageTransform(size=24, normalize="symmetric"))
    kwargs.setdefault("buckets", BUCKETS)
    return ShardDataset(urls, **kwargs)


def log_gap(buckets: Buckets) -> float:
    """Half the largest log-ratio gap between neighbouring buckets: the most an image's aspect can move."""
    ratios = sorted(math.log(w / h) for w, h in buckets.sizes)
    return max(b - a for a, b in zip(ratios, ratios[1:], strict=False)) / 2


# -- buckets ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_area", "step", "options"),
    [
        (512 * 512, 64, {"max_aspect": 2.0}),
        (1024 * 1024, 64, {"max_aspect": 4.0}),
        (768 * 768, 32, {"min_side": 512, "max_side": 1152, "max_aspect": None}),
        (64 * 64, 16, {"max_aspect": None}),
    ],
)
def test_generated_buckets_have_about_equal_areas_sides_at_the_step_and_limits(
    max_area: int, step: int, options: dict
) -> None:
    sizes = generate_buckets(max_area, step, **options)
    assert len(sizes) >= 3 and len(set(sizes)) == len(sizes)
    for width, height in sizes:
        assert width % step == 0 and height % step == 0
        # never more than the budget, and at most one step times the shorter side below it
        assert max_area - step * math.sqrt(max_area) <= width * height <= max_area
        assert (height, width) in sizes  # both orientations
        if options.get("max_aspect"):
            assert max(width, height) / min(width, height) <= options["max_aspect"]
        if options.get("min_side"):
            assert min(width, height) >= options["min_side"]
        if options.get("max_side"):
            assert max(width, height) <= options["max_side"]
    if math.isqrt(max_area) % step == 0:
        assert (math.isqrt(max_area),) * 2 in sizes
    ratios = [w / h for w, h in sizes]
    assert ratios == sorted(ratios)
    assert generate_buckets(512 * 512, 64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


def test_bucket_config_forms_and_errors_name_the_key() -> None:
    assert Buckets.from_config(None) is None
    generated = Buckets.from_config(BUCKETS)
    assert generated.sizes == ((32, 72), (40, 56), (48, 48), (56, 40), (72, 32)) and not generated.drop_partial
    explicit = Buckets.from_config({"sizes": [[512, 512], [576, 448], [448, 576]], "step": 64, "drop_partial": True})
    assert explicit.sizes == ((512, 512), (576, 448), (448, 576)) and explicit.drop_partial
    errors = [
        ({"max_area": 4096, "stpe": 16}, r"data\.buckets\.stpe is not a bucket option"),
        ({"step": 16}, r"data\.buckets needs either max_area .* or sizes"),
        ({"max_area": 4096, "sizes": [[64, 64]]}, "not both"),
        ({"max_area": -1}, r"data\.buckets\.max_area must be a positive integer"),
        ({"max_area": 4096, "step": 0}, r"data\.buckets\.step must be a positive integer"),
        ({"max_area": 4096, "max_aspect": 0.5}, r"data\.buckets\.max_aspect .* at least 1"),
        ({"max_area": 4096, "step": 16, "min_side": 128}, r"data\.buckets: no bucket"),
        ({"sizes": [[512, 500]], "step": 64}, r"data\.buckets\.sizes: \[512, 500\] .* not a multiple of step=64"),
        ({"sizes": [[512]]}, r"data\.buckets\.sizes must be a list of \[width, height\] pairs"),
        ({"sizes": [[512, 512], [256, 256]]}, "same aspect ratio"),
        ({"sizes": [[64, 64]], "max_aspect": 2.0}, r"data\.buckets\.max_aspect applies to generated buckets"),
        ({"max_area": 4096, "drop_partial": "yes"}, r"data\.buckets\.drop_partial must be true or false"),
        ("512x512", r"data\.buckets must be null or a mapping"),
    ]
    for spec, message in errors:
        with pytest.raises(ConfigError, match=message):
            Buckets.from_config(spec)


def test_assignment_picks_the_nearest_aspect_ratio() -> None:
    buckets = Buckets.from_config({"sizes": [[512, 512], [576, 448], [640, 384], [448, 576], [384, 640]]})
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.randint(20, 3000), rng.randint(20, 3000)
        chosen = buckets.sizes[buckets.assign(width, height)]
        distance = [abs(math.log(w / h) - math.log(width / height)) for w, h in buckets.sizes]
        assert abs(math.log(chosen[0] / chosen[1]) - math.log(width / height)) == min(distance)
    assert buckets.size_for(1000, 1000) == (512, 512)
    assert buckets.size_for(4000, 1000) == (640, 384)  # beyond the range: the widest
    assert buckets.size_for(1000, 4000) == (384, 640)
    assert buckets.size_for(1200, 1000) == (576, 448)  # 1.2: nearer 1.29 than 1.0 in log-ratio


def test_resize_and_crop_keeps_the_aspect_and_crops_only_the_mismatch() -> None:
    # 300 x 100 (aspect 3) into 128 x 64 (aspect 2): a third of the width goes, half of it on each side
    pixels = np.zeros((100, 300, 3), np.uint8)
    pixels[:, 50:250] = 255
    out = resize_and_crop(Image.fromarray(pixels), (128, 64))
    assert out.size == (128, 64)
    array = np.asarray(out)
    assert array[:, 2:-2].min() >= 250  # only the white middle is left, nothing stretched
    # same aspect ratio: nothing is cropped, the dark border survives on every side
    framed = np.full((100, 200, 3), 255, np.uint8)
    framed[:10], framed[-10:], framed[:, :10], framed[:, -10:] = 0, 0, 0, 0
    array = np.asarray(resize_and_crop(Image.fromarray(framed), (128, 64)))
    assert array[:, 0].max() < 60 and array[:, -1].max() < 60 and array[0].max() < 60 and array[-1].max() < 60
    assert array[32, 64].min() > 200
    # a random crop moves only along the cropped axis, within the image
    ramp = Image.fromarray(np.repeat(np.linspace(0, 255, 300).astype(np.uint8)[None, :], 100, axis=0))
    rng = random.Random(1)
    crops = [np.asarray(resize_and_crop(ramp.convert("RGB"), (64, 64), crop="random", rng=rng)) for _ in range(4)]
    assert len({crop[0, 0, 0] for crop in crops}) > 1  # different offsets along the width
    assert all((crop == crop[:1]).all() for crop in crops)  # the full height each time: columns are constant
    # the transform's version: tensor (3, H, W)
    assert ImageTransform(size=8, normalize="none").fit(Image.fromarray(pixels), (40, 24)).shape == (3, 24, 40)


# -- the bucketed pipeline --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bucketed_epoch_single_bucket_batches_every_key_once_aspect_kept(tmp_path: Path, num_workers: int) -> None:
    sizes = write_mixed(tmp_path)
    ds = bucketed(str(tmp_path / "train.manifest.json"), num_workers=num_workers, shuffle_buffer=8, seed=3)
    buckets, tolerance = ds.buckets, log_gap(ds.buckets)
    seen: list[str] = []
    for batch in ShardLoader(ds, num_workers=num_workers):
        width, height = batch["bucket"]
        assert batch["image"].shape == (len(batch["key"]), 3, height, width)
        for key in batch["key"]:
            source = sizes[key]
            assert buckets.size_for(*source) == (width, height)  # every sample of the batch belongs to its bucket
            assert abs(math.log(width / height) - math.log(source[0] / source[1])) <= tolerance + 1e-9
        seen += batch["key"]
    assert sorted(seen) == sorted(sizes)  # exact mode: every sample once, partial batches included


def test_drop_partial_keeps_only_full_batches(tmp_path: Path) -> None:
    write_mixed(tmp_path)
    ds = bucketed(str(tmp_path / "train.manifest.json"), buckets={**BUCKETS, "drop_partial": True})
    batches = list(ShardLoader(ds))
    assert batches and all(len(b["key"]) == 4 for b in batches)
    assert 40 - len(batches) * 4 <= len(ds.buckets) * 3  # at most batch_size - 1 per bucket left over


def test_two_ranks_of_a_bucketed_epoch_partition_the_samples(tmp_path: Path) -> None:
    sizes = write_mixed(tmp_path)
    seen: list[str] = []
    for rank in range(2):
        ds = bucketed(str(tmp_path / "train.manifest.json"), rank=rank, world_size=2, num_workers=2, seed=5)
        seen += [key for batch in ShardLoader(ds, num_workers=2) for key in batch["key"]]
    assert sorted(seen) == sorted(sizes)


def loader(shards: Path, num_workers: int, mode: str = "exact") -> ShardLoader:
    dataset = bucketed(
        str(shards / "train.manifest.json"),
        mode=mode,
        epoch_length=64 if mode == "resampled" else None,
        transform=ImageTransform(size=24, crop="random", flip=True),
        shuffle_buffer=8,
        seed=3,
        num_workers=num_workers,
    )
    return ShardLoader(dataset, num_workers=num_workers)


@pytest.mark.parametrize(
    ("num_workers", "mode", "stop_after"),
    # an epoch is 15 batches with 2 workers (8 + 7; the partial ones from the 9th on), 18 with 3 (6 each)
    [(0, "exact", 4), (2, "exact", 5), (2, "exact", 10), (2, "exact", 14), (2, "exact", 19), (3, "exact", 8)]
    + [(2, "resampled", 7)],
)
def test_a_resumed_bucketed_loader_continues_the_interrupted_stream_exactly(
    tmp_path: Path, num_workers: int, mode: str, stop_after: int
) -> None:
    write_mixed(tmp_path, n=44)  # 9 shards, the last one short
    uninterrupted = take(loader(tmp_path, num_workers, mode), epochs=2)
    first = loader(tmp_path, num_workers, mode)
    head = take(first, epochs=2, stop_after=stop_after)
    state = first.state_dict()
    assert state["consumed"] > 0  # interrupted mid-epoch, with samples waiting in the bucket buffers
    second = loader(tmp_path, num_workers, mode)
    second.load_state_dict(state)
    resumed = head + take(second, epochs=2 - state["epoch"])
    assert [b["key"] for b in resumed] == [b["key"] for b in uninterrupted]
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["bucket"] == b["bucket"] and torch.equal(a["image"], b["image"])  # same crops and flips


def test_cached_latents_of_several_shapes_are_batched_by_shape(tmp_path: Path) -> None:
    import io

    with ShardWriter(tmp_path, "cache", 4) as writer:
        for i in range(10):
            buffer = io.BytesIO()
            np.save(buffer, np.zeros((4, 8, 12) if i % 3 else (4, 10, 8), np.float16))
            writer.write_members(f"k{i}", {"latents.npy": buffer.getvalue()}, f"caption {i}")
    ds = bucketed(str(tmp_path / "cache.manifest.json"), batch_size=3)
    batches = list(ShardLoader(ds))
    assert sorted(k for b in batches for k in b["key"]) == sorted(f"k{i}" for i in range(10))
    assert {tuple(b["latents"].shape[1:]) for b in batches} == {(4, 8, 12), (4, 10, 8)}


# -- models and tasks on non-square images ----------------------------------------------------------------------------

AE = {**TINY_AE, "ddconfig": {**TINY_AE["ddconfig"], "attn_resolutions": [16]}}  # attention over H * W
UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "context_dim": 32,
}


def test_tiny_unet_and_autoencoder_forward_and_backward_on_non_square_inputs() -> None:
    from trainer.models.autoencoder import AutoencoderKL
    from trainer.models.unet import UNetModel

    torch.manual_seed(0)
    autoencoder, unet = AutoencoderKL.from_config(AE), UNetModel.from_config(UNET)
    images = torch.randn(2, 3, 24, 40)  # H != W
    reconstructions, posterior = autoencoder(images)
    assert reconstructions.shape == images.shape and posterior.mean.shape == (2, 4, 12, 20)
    (reconstructions - images).abs().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in autoencoder.parameters() if p.requires_grad)

    for module in unet.modules():  # the zero-initialised output layers would leave the input without gradient
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.normal_(module.weight, std=0.05)
    latents = posterior.mode().detach().requires_grad_(True)
    output = unet(latents, torch.tensor([10, 500]), torch.randn(2, 5, 32))
    assert output.shape == latents.shape
    output.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters())
    assert latents.grad is not None and latents.grad.abs().sum() > 0


class StubTextEncoder(nn.Module):
    """Stands in for the CLIP text tower: a fixed context per prompt."""

    width = 32

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([torch.full((5, self.width), float(len(p)) / 10) for p in prompts])


def test_generate_takes_any_width_and_height_at_the_latent_stride() -> None:
    from trainer.diffusion import alphas_cumprod, beta_schedule
    from trainer.generate import LatentDiffusion
    from trainer.models.autoencoder import AutoencoderKL
    from trainer.models.unet import UNetModel

    torch.manual_seed(0)
    pipeline = LatentDiffusion(
        UNetModel.from_config(UNET),
        AutoencoderKL.from_config(AE),
        StubTextEncoder(),
        alphas_cumprod(beta_schedule("scaled_linear")),
    )
    assert pipeline.latent_stride == 4  # autoencoder 2 x UNet 2
    images = pipeline.generate(["a", "bb"], width=48, height=28, steps=2)
    assert images.shape == (2, 3, 28, 48)
    with pytest.raises(ValueError, match=r"width 50 is not a multiple of 4.*e\.g\. 48 or 52"):
        pipeline.generate(["a"], width=50, height=28, steps=2)
    with pytest.raises(ValueError, match="height 30 is not a multiple of 4"):
        pipeline.generate(["a"], width=48, height=30, steps=2)


def test_autoencoder_task_trains_and_validates_on_bucketed_batches(tmp_path: Path) -> None:
    from trainer.tasks.autoencoder import AutoencoderTask

    write_mixed(tmp_path / "shards", "train", 16, 4)
    write_mixed(tmp_path / "shards", "val", 12, 6, seed=4)
    data = ShardDataModule(
        train={"urls": str(tmp_path / "shards" / "train.manifest.json")},
        val={"urls": str(tmp_path / "shards" / "val.manifest.json")},
        batch_size=2,
        num_workers=0,
        normalize="symmetric",
        require_caption=False,
        buckets={"max_area": 1024, "step": 8, "max_aspect": 2.5},  # 32 x 32 px: 24x40, 32x32, 40x24 ...
    )
    torch.manual_seed(0)
    task = AutoencoderTask(AE, disc_start=10**9, scale_factor_samples=64, log_images=2)
    trainer = pl.Trainer(
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=3,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/psnr"]) and task.scale_factor.item() != 1.0  # latents of several shapes
    validated = [b for b, _ in zip(data.val_dataloader(), range(3), strict=False)]  # limit_val_batches
    assert len({b["image"][0].numel() for b in validated}) > 1  # latents of different sizes went into the scale


@pytest.fixture(scope="module")
def ldm_task(tmp_path_factory: pytest.TempPathFactory):
    """A latent diffusion task on stand-ins for the earlier stages (a tiny CLIP export and autoencoder export)."""
    from test_latent_diffusion import CLIP
    from test_latent_diffusion import UNET as LDM_UNET

    from trainer.checkpoints import export_vae
    from trainer.models.autoencoder import AutoencoderKL
    from trainer.models.clip import build_clip, export_clip
    from trainer.tasks.latent_diffusion import LatentDiffusionTask

    folder = tmp_path_factory.mktemp("ldm")
    ldm_ae = {**AE, "ddconfig": {**AE["ddconfig"], "ch_mult": [1, 2, 2]}}  # f4: small latents, quick sampling
    torch.manual_seed(0)
    clip, _ = build_clip("bucket-test-clip", CLIP)
    export_clip(clip, "bucket-test-clip", CLIP, folder / "clip")
    export_vae(AutoencoderKL.from_config(ldm_ae), folder / "vae.safetensors", scale_factor=0.5, config=ldm_ae)
    return LatentDiffusionTask(
        {**LDM_UNET, "attention_resolutions": [2]},  # attention at the lower level only: quick on the CPU
        {"checkpoint": str(folder / "vae.safetensors")},
        {"source": str(folder / "clip")},
        ema_decay=None,
        validation={"prompts": ["a red circle"], "steps": 2, "height": 32, "width": 48},
    )


def test_latent_diffusion_loss_on_a_non_square_batch_and_the_stride_check(ldm_task) -> None:
    task = ldm_task
    batch = {"image": torch.rand(2, 3, 24, 40) * 2 - 1, "caption": ["a red circle", "a blue square"]}
    latents, context = task.latents_and_context(batch, drop_captions=False)
    assert latents.shape == (2, 4, 6, 10)
    loss = task.diffusion_loss(latents, context, torch.tensor([3, 700]), torch.randn_like(latents)).mean()
    loss.backward()
    assert all(p.grad is not None for p in task.unet.parameters())
    task.unet.zero_grad(set_to_none=True)
    # the latent stride: the autoencoder's 4 times the two-level UNet's 2
    with pytest.raises(ConfigError, match=r"width 44 is not a multiple of 8: training images"):
        task.latents_and_context({**batch, "image": torch.zeros(2, 3, 24, 44)}, drop_captions=False)
    images, _ = task.sample_grid()  # the validation grid at the configured width and height
    assert images.shape == (1, 3, 32, 48)


def test_the_readme_sampling_command_at_a_non_square_size(ldm_task, tmp_path: Path) -> None:
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": ldm_task.state_dict(), "hyper_parameters": dict(ldm_task.hparams)}, checkpoint)
    spec = importlib.util.spec_from_file_location("sample_tool", REPO / "tools" / "sample.py")
    sample_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_tool)
    out = tmp_path / "wide"
    argv = [str(checkpoint), "--prompt", "a red circle", "--width", "80", "--height", "48", "--steps", "10"]
    assert sample_tool.main([*argv, "--out", str(out)]) == 0
    assert Image.open(out / "0000.png").size == (80, 48)
    assert json.loads((out / "prompts.jsonl").read_text().splitlines()[0])["file"] == "0000.png"
    assert sample_tool.main([*argv[:-4], "--width", "84", "--out", str(tmp_path / "bad")]) == 2


def test_cached_latents_in_buckets_train_in_batches_of_one_shape(ldm_task, tmp_path: Path) -> None:
    sizes = write_mixed(tmp_path / "shards", n=12, per_shard=6)
    spec = importlib.util.spec_from_file_location("cache_tool", REPO / "tools" / "cache_latents.py")
    cache_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cache_tool)
    argv = ["--autoencoder", ldm_task.hparams.autoencoder["checkpoint"], "--batch-size", "4"]
    argv += ["--urls", str(tmp_path / "shards" / "train.manifest.json"), "--out", str(tmp_path / "cache")]
    assert cache_tool.main([*argv, "--buckets", json.dumps(BUCKETS)]) == 0
    ds = bucketed(str(tmp_path / "cache" / "train.manifest.json"), batch_size=3)
    buckets, seen = ds.buckets, []
    for batch in ShardLoader(ds):
        for key, latents in zip(batch["key"], batch["latents"], strict=True):
            width, height = buckets.size_for(*sizes[key])
            assert latents.shape == (4, height // 4, width // 4)  # the f4 latents of the image's bucket
        seen += batch["key"]
    assert sorted(seen) == sorted(sizes)
    assert cache_tool.main([*argv, "--buckets", "{max_area: 1}"]) == 2  # not JSON: a clear error


# -- configs ----------------------------------------------------------------------------------------------------------

README_BUCKETS = "data.buckets={max_area: 4096, step: 16, max_aspect: 2.0}"


def test_the_readme_bucket_override_composes_and_reaches_the_pipeline(tmp_path: Path, caplog) -> None:
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from test_configs import compose_config

    for experiment in ("photos_autoencoder", "shapes_ldm"):
        cfg = compose_config(tmp_path, [f"experiment={experiment}", README_BUCKETS])
        data = instantiate(cfg.data, prepare=None)
        assert data.buckets.sizes == ((48, 80), (64, 64), (80, 48))
    assert "data.resize_size=256 is not used with data.buckets" in caplog.text  # photos crop patches otherwise
    cfg = compose_config(tmp_path, ["experiment=shapes_clip", "data.buckets={max_area: 4096, step: 0}"])
    with pytest.raises(InstantiationException, match=r"data\.buckets\.step must be a positive integer"):
        instantiate(cfg.data, prepare=None)


@pytest.mark.slow
def test_the_readme_bucketed_autoencoder_run(tmp_path: Path) -> None:
    """The README's command, with debug=fast: the photos (real, non-square) in buckets of ~64 x 64 px."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", "experiment=photos_autoencoder", README_BUCKETS, "debug=fast"]
        + [f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}", "data.batch_size=2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
