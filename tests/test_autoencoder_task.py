"""Stage 2, the autoencoder task: loss terms, discriminator schedule, EMA, weights in and out."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchvision

from trainer.checkpoints import export_vae, load_vae_weights, read_weights, save_safetensors
from trainer.data.photos import ensure_photos
from trainer.datamodule import ShardDataModule
from trainer.errors import ConfigError
from trainer.models.autoencoder import TINY, AutoencoderKL
from trainer.models.lpips import LPIPS
from trainer.tasks.autoencoder import AutoencoderTask, adaptive_weight, adopt_weight, hinge_d_loss, psnr
from trainer.tasks.optimization import warmup_cosine

MODEL = {
    "embed_dim": 4,
    "ddconfig": {**TINY["ddconfig"], "ch": 32, "ch_mult": [1, 2], "resolution": 32},
}


def test_hinge_loss_closed_form() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    expected = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.0) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)


def test_adaptive_weight_is_the_ratio_of_gradient_norms() -> None:
    last = torch.ones(3, 4, requires_grad=True)
    nll = 2.0 * (last**2).sum()  # gradient 4 * last: norm 4 * sqrt(12)
    g = -0.5 * last.sum()  # gradient -0.5: norm 0.5 * sqrt(12)
    expected = 4 * math.sqrt(12) / (0.5 * math.sqrt(12) + 1e-4)
    assert adaptive_weight(nll, g, last).item() == pytest.approx(expected, rel=1e-6)
    huge = adaptive_weight(1e9 * last.sum(), 0 * last.sum(), last)
    assert huge.item() == 1e4  # clamped


def test_adopt_weight_and_psnr() -> None:
    assert adopt_weight(1.0, 99, 100) == 0.0 and adopt_weight(1.0, 100, 100) == 1.0
    x = torch.zeros(1, 3, 8, 8)
    assert psnr(x, x + 0.2).item() == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-5)  # mse 0.1^2 in [0, 1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_photos(tmp_path_factory.mktemp("photos"), scale=64, crop=32, val_crops=4)


def fit(task: AutoencoderTask, photos: Path, tmp_path: Path, steps: int) -> pl.Trainer:
    data = ShardDataModule(
        train={"urls": str(photos / "train.manifest.json"), "mode": "resampled", "epoch_length": 64},
        val={"urls": str(photos / "val.manifest.json")},
        batch_size=4,
        num_workers=0,
        image_size=32,
        crop="random",
        normalize="symmetric",
        require_caption=False,
    )
    trainer = pl.Trainer(
        max_steps=steps,
        limit_val_batches=1,
        val_check_interval=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    return trainer


def test_discriminator_starts_at_its_step_and_global_step_counts_batches(photos: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = AutoencoderTask(MODEL, disc_start=3, optimizer={"lr": 1e-3})
    before = {k: v.clone() for k, v in task.discriminator.state_dict().items() if "weight" in k}
    trainer = fit(task, photos, tmp_path / "a", steps=3)
    assert trainer.global_step == 3  # two optimizers, but one step per batch
    after = task.discriminator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the discriminator trained before disc_start"
    trainer = fit(task, photos, tmp_path / "b", steps=5)  # steps 3 and 4: past the start
    assert trainer.global_step == 5
    after = task.discriminator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_scheduler_warms_up_then_decays_the_autoencoder_lr_only(photos: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    schedule = {"warmup_steps": 2, "min_lr_ratio": 0.1}
    task = AutoencoderTask(MODEL, disc_start=1000, optimizer={"lr": 1e-3}, scheduler=schedule)
    seen = []
    task.on_train_batch_start = lambda batch, index: seen.append(task.optimizers()[0].param_groups[0]["lr"])
    fit(task, photos, tmp_path, steps=6)
    factor = warmup_cosine(2, 6, 0.1)  # over trainer.max_steps
    assert seen == pytest.approx([1e-3 * factor(step) for step in range(6)])
    assert seen[0] < seen[1] and seen[1] == pytest.approx(1e-3) and seen[-1] < seen[3] < seen[2]
    assert task.optimizers()[1].param_groups[0]["lr"] == 1e-3  # the discriminator's stays constant


def test_ema_weights_are_validated_and_exported(photos: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = AutoencoderTask(MODEL, disc_start=1000, ema_decay=0.9, optimizer={"lr": 1e-3})
    fit(task, photos, tmp_path, steps=3)
    trained = task.autoencoder.state_dict()
    ema = task.ema.module.state_dict()
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)
    assert not any(p.requires_grad for p in task.ema.parameters())  # DDP refuses parameters the loss never used
    exported = tmp_path / "export" / "autoencoder.safetensors"
    state, metadata = read_weights(exported)
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    assert float(metadata["scale_factor"]) == pytest.approx(task.scale_factor.item()) and task.scale_factor != 1.0


def test_vae_weights_round_trip_and_the_sd_layouts(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = AutoencoderKL.from_config(MODEL)
    export_vae(source, tmp_path / "vae.safetensors", scale_factor=0.18215)
    save_safetensors({f"first_stage_model.{k}": v for k, v in source.state_dict().items()}, tmp_path / "sd.safetensors")
    torch.save(
        {"state_dict": {f"first_stage_model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "sd.ckpt"
    )
    for name, scale in (("vae.safetensors", 0.18215), ("sd.safetensors", None), ("sd.ckpt", None)):
        target = AutoencoderKL.from_config(MODEL)
        assert load_vae_weights(target, tmp_path / name) == scale
        assert all(
            torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values(), strict=True)
        )


def test_mismatched_vae_file_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    state = AutoencoderKL.from_config(MODEL).state_dict()
    state["decoder.extra.weight"] = torch.zeros(1)
    del state["quant_conv.bias"]
    save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match=r"1 missing keys \['quant_conv.bias'\], 1 unexpected keys \['decoder.extra"):
        load_vae_weights(AutoencoderKL.from_config(MODEL), tmp_path / "bad.safetensors")
    other = AutoencoderKL.from_config({**MODEL, "embed_dim": 3})
    with pytest.raises(ConfigError, match="shape mismatches"):
        load_vae_weights(other, tmp_path / "bad.safetensors")


def test_lpips_reads_the_vgg_weights_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    lpips = LPIPS(tmp_path / "vgg16.pth")
    assert torch.equal(getattr(lpips.net.net.slice1, "0").weight, vgg.features[0].weight)
    assert torch.equal(getattr(lpips.net.net.slice5, "28").weight, vgg.features[28].weight)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.all(lpips(x, x) == 0) and torch.all(lpips(x, y) > 0)
    assert not any(p.requires_grad for p in lpips.parameters())
    task = AutoencoderTask(MODEL, lpips_weights=str(tmp_path / "vgg16.pth"))
    assert task.lpips is not None


def test_missing_lpips_file_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        AutoencoderTask(MODEL, lpips_weights=str(tmp_path / "nope.pth"))


@pytest.mark.slow
def test_a_tiny_autoencoder_learns_real_photo_crops(tmp_path: Path) -> None:
    """~2 minutes on 2 cores: 800 steps of 32 px crops of scikit-image's photos (f4, 8x8x4 latents).

    Measured on held-out photo crops: 20.6 dB PSNR (SSIM 0.75) after these 800 steps; an untrained
    model is far below 10 dB. The threshold keeps a 2.5 dB margin for thread-order noise.
    """
    photos = ensure_photos(tmp_path / "photos", scale=128, crop=32, val_crops=16)
    model = {"embed_dim": 4, "ddconfig": {**TINY["ddconfig"], "ch": 32, "ch_mult": [1, 2, 2], "resolution": 32}}
    torch.manual_seed(0)
    task = AutoencoderTask(model, disc_start=10**9, optimizer={"lr": 2e-3}, kl_weight=1e-6)
    data = ShardDataModule(
        train={"urls": str(photos / "train.manifest.json"), "mode": "resampled", "epoch_length": 10**6},
        val={"urls": str(photos / "val.manifest.json")},
        batch_size=8,
        num_workers=1,
        image_size=32,
        resize_size=128,
        crop="random",
        flip=True,
        normalize="symmetric",
        require_caption=False,
    )
    trainer = pl.Trainer(
        max_steps=800,
        val_check_interval=800,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=data)
    assert trainer.callback_metrics["val/psnr"] > 18.0


def test_scale_factor_tool_measures_and_stores_it_in_the_checkpoint(photos: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import REPO

    torch.manual_seed(0)
    task = AutoencoderTask(MODEL)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, tmp_path / "ae.ckpt")
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "scale_factor.py"), str(tmp_path / "ae.ckpt")]
        + ["--urls", str(photos / "val.manifest.json"), "--samples", "1000", "--image-size", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stored = torch.load(tmp_path / "ae.ckpt", weights_only=True)["state_dict"]["scale_factor"].item()
    assert f"scale_factor = {stored:.6f}" in result.stdout
    # 1 / std of the posterior samples (SD's definition), whose variance is var(mean) + E[var]
    data = ShardDataModule(
        train={"urls": str(photos / "val.manifest.json")},
        batch_size=4,
        num_workers=0,
        image_size=32,
        normalize="symmetric",
    )
    data.setup("fit")
    with torch.no_grad():
        posteriors = [task.autoencoder.encode(b["image"]) for b in data.train_dataloader()]
    means = torch.cat([p.mean for p in posteriors])
    variance = means.var() + torch.cat([p.var for p in posteriors]).mean()
    assert stored == pytest.approx(1 / variance.sqrt().item(), rel=0.03)


def test_validation_quality_is_computed_in_float32_under_bf16_autocast() -> None:
    """Under bf16 mixed precision the decoder returns bf16 and convolutions run in bf16: on flat images (the
    shapes data) SSIM's local variances cancelled to noise (0.44, or above 1, for reconstructions float32
    reads at 0.98) until the metrics turned autocast off."""
    generator = torch.Generator().manual_seed(0)
    images = torch.full((2, 3, 64, 64), -0.2)
    images[:, 0, 20:36, 24:40] = 0.8  # a flat figure on a flat background
    reconstructions = (images + 0.01 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    expected = AutoencoderTask.quality(images, reconstructions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = AutoencoderTask.quality(images, reconstructions)
        rounded = AutoencoderTask.quality(images, reconstructions.bfloat16())  # as the decoder returns them
    assert all(value.dtype == torch.float32 for value in mixed.values())
    for name, value in expected.items():
        assert mixed[name].item() == pytest.approx(value.item(), rel=1e-4), name
    assert rounded["ssim"].item() == pytest.approx(expected["ssim"].item(), abs=0.01)
    assert expected["psnr"].item() == pytest.approx(psnr(images, reconstructions).mean().item())
