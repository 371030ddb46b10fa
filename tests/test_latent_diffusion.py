"""Stage 3, latent diffusion: the task around the frozen stages, export/import, sampling, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import pytorch_lightning as pl
import torch
from safetensors import safe_open

from conftest import REPO, write_shards
from tiny import AE, CLIP, UNET
from trainer.checkpoints import export_vae
from trainer.data import shapes
from trainer.data.shards import ShardWriter
from trainer.datamodule import ShardDataModule
from trainer.errors import ConfigError
from trainer.models.autoencoder import AutoencoderKL
from trainer.models.clip import build_clip, export_clip
from trainer.models.text_encoder import TextEncoder
from trainer.tasks.latent_diffusion import LatentDiffusionTask

VALIDATION = {"prompts": ["a red circle", "a blue square"], "steps": 3, "height": 32, "width": 32}


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-ins for the outputs of stages 1 and 2: a CLIP export folder and an autoencoder export."""
    folder = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    clip, _ = build_clip("ldm-test-clip", CLIP)
    export_clip(clip, "ldm-test-clip", CLIP, folder / "clip")
    export_vae(AutoencoderKL.from_config(AE), folder / "vae.safetensors", scale_factor=0.5, config=AE)
    write_shards(folder / "shards", "train", 16, 8, size=32)
    write_shards(folder / "shards", "val", 8, 4, size=32, seed=1)
    return folder


def make_task(stages: Path, **kwargs) -> LatentDiffusionTask:
    kwargs.setdefault("validation", VALIDATION)
    kwargs.setdefault("ema_decay", 0.9)
    return LatentDiffusionTask(
        UNET, {"checkpoint": str(stages / "vae.safetensors")}, {"source": str(stages / "clip")}, **kwargs
    )


def fit(task: LatentDiffusionTask, stages: Path, root: Path, steps: int = 3, **trainer_options) -> pl.Trainer:
    data = ShardDataModule(
        train={"urls": str(stages / "shards" / "train.manifest.json")},
        val={"urls": str(stages / "shards" / "val.manifest.json")},
        batch_size=4,
        num_workers=0,
        image_size=32,
        normalize="symmetric",
    )
    trainer = pl.Trainer(
        max_steps=steps,
        val_check_interval=steps,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        default_root_dir=root,
        enable_progress_bar=False,
        **trainer_options,
    )
    trainer.fit(task, datamodule=data)
    return trainer


def test_text_encoder_last_layer_matches_open_clips_own_text_features(stages: Path) -> None:
    encoder = TextEncoder.from_source(str(stages / "clip"))
    clip = open_clip.create_model(f"local-dir:{stages / 'clip'}").eval()
    tokens = encoder.tokenizer(["a red circle", "two blue squares on grey"])
    with torch.no_grad():
        hidden = encoder(tokens)  # (B, L, width)
        pooled = hidden[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ clip.text_projection
        torch.testing.assert_close(pooled, clip.encode_text(tokens), atol=1e-5, rtol=1e-5)
    assert hidden.shape == (2, 16, 64) and encoder.width == 64
    penultimate = TextEncoder.from_source(str(stages / "clip"), layer="penultimate")
    assert not torch.allclose(penultimate(tokens), hidden)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_the_frozen_stages_are_checked_against_the_unet(stages: Path) -> None:
    with pytest.raises(ConfigError, match="context_dim"):
        LatentDiffusionTask(
            {**UNET, "context_dim": 32},
            {"checkpoint": str(stages / "vae.safetensors")},
            {"source": str(stages / "clip")},
        )
    with pytest.raises(ConfigError, match="in_channels"):
        LatentDiffusionTask(
            {**UNET, "in_channels": 3},
            {"checkpoint": str(stages / "vae.safetensors")},
            {"source": str(stages / "clip")},
        )
    task = make_task(stages)
    assert task.scale_factor == 0.5  # read from the autoencoder export
    assert not any(p.requires_grad for p in task.autoencoder.parameters())


def test_latents_are_posterior_samples_or_its_mode(stages: Path) -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = {"image": images, "caption": ["a red circle", "a blue square"]}
    sampled = make_task(stages)
    first, _ = sampled.latents_and_context(batch, drop_captions=False)
    second, _ = sampled.latents_and_context(batch, drop_captions=False)
    assert not torch.equal(first, second)  # a fresh posterior sample each time (the random VAE's is wide)
    mode = LatentDiffusionTask(
        UNET, {"checkpoint": str(stages / "vae.safetensors"), "posterior": "mode"}, {"source": str(stages / "clip")}
    )
    latents, _ = mode.latents_and_context(batch, drop_captions=False)
    expected = mode.autoencoder.encode(images).mode() * mode.scale_factor
    torch.testing.assert_close(latents, expected)
    with pytest.raises(ConfigError, match="posterior"):
        LatentDiffusionTask(
            UNET, {"checkpoint": str(stages / "vae.safetensors"), "posterior": "mean"}, {"source": str(stages / "clip")}
        )


def test_training_steps_validation_grid_ema_and_export(stages: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = make_task(stages)
    trainer = fit(task, stages, tmp_path)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val/loss_t500" in metrics and "val/loss" in metrics
    assert (tmp_path / "images" / "samples_00000003.png").is_file()
    trained, ema = task.unet.state_dict(), task.ema_unet.module.state_dict()
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)
    assert not any(p.requires_grad for p in task.ema_unet.parameters())  # DDP refuses parameters the loss never used
    with safe_open(str(tmp_path / "export" / "ldm.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert float(f.metadata()["scale_factor"]) == 0.5
        assert torch.equal(f.get_tensor("model.diffusion_model.out.2.weight"), ema["out.2.weight"])
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model"}

    # the export is "released weights" for the next fine-tune: UNet and VAE load strictly
    fresh = make_task(stages, pretrained=str(tmp_path / "export" / "ldm.safetensors"))
    assert all(torch.equal(fresh.unet.state_dict()[k], v) for k, v in ema.items())


def test_the_ema_follows_optimizer_steps_not_batches(stages: Path, tmp_path: Path) -> None:
    task = make_task(stages, validation={**VALIDATION, "prompts": ["a red circle"]})
    fit(task, stages, tmp_path, steps=2, accumulate_grad_batches=2, enable_checkpointing=False)
    assert int(task.ema_unet.n_averaged) == 2  # 4 batches, 2 optimizer steps


def test_an_export_records_the_unet_norm_groups_and_a_mismatch_is_refused(stages: Path, tmp_path: Path) -> None:
    """The group count changes no tensor's shape: without the metadata, 8-group weights would load strictly
    into a 32-group UNet and compute something else."""
    grouped = LatentDiffusionTask(
        {**UNET, "norm_num_groups": 8},
        {"checkpoint": str(stages / "vae.safetensors")},
        {"source": str(stages / "clip")},
    )
    path = grouped.export(tmp_path / "ldm.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["unet_norm_num_groups"] == "8"
    with pytest.raises(ConfigError, match="norm_num_groups=8"):
        make_task(stages, pretrained=str(path))  # the tiny UNet's default: 32
    same = LatentDiffusionTask(
        {**UNET, "norm_num_groups": 8},
        {"checkpoint": str(stages / "vae.safetensors")},
        {"source": str(stages / "clip")},
        pretrained=str(path),
    )
    assert all(torch.equal(same.unet.state_dict()[k], v) for k, v in grouped.unet.state_dict().items())


def test_mismatched_pretrained_file_lists_the_keys(stages: Path, tmp_path: Path) -> None:
    from trainer.checkpoints import save_safetensors

    task = make_task(stages)
    state = {f"model.diffusion_model.{k}": v for k, v in task.unet.state_dict().items() if not k.startswith("out.")}
    save_safetensors(state, tmp_path / "partial.safetensors")
    with pytest.raises(ConfigError, match=r"missing keys \['out.0.weight'"):
        make_task(stages, pretrained=str(tmp_path / "partial.safetensors"))


def test_generation_is_reproducible_per_seed_and_sizes_follow_the_latent_stride(stages: Path) -> None:
    pipeline = make_task(stages).pipeline()
    a = pipeline.generate(["a red circle", "a blue square"], steps=3, seeds=[5, 6], height=32, width=16)
    b = pipeline.generate(["a blue square"], steps=3, seeds=[6], height=32, width=16)
    assert a.shape == (2, 3, 32, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=0)  # image 2 alone = image 2 in a batch
    # the latent stride is the autoencoder's 2 times the two-level UNet's 2
    with pytest.raises(ConfigError, match="height 30 is not a multiple of 4"):
        pipeline.generate(["x"], steps=2, height=30, width=32)


@pytest.mark.slow
def test_sampling_cli_end_to_end(stages: Path, tmp_path: Path) -> None:
    trainer = fit(make_task(stages), stages, tmp_path / "run", steps=2)
    checkpoint = trainer.checkpoint_callback.best_model_path or next((tmp_path / "run").rglob("*.ckpt"))
    out = tmp_path / "samples"
    prompt = "a small red circle in the top left"
    command = [sys.executable, str(REPO / "tools" / "sample.py"), str(checkpoint), "--prompt", prompt]
    command += ["--prompt", "a blue square", "--negative-prompt", "green", "--batch", "2", "--steps", "3"]
    command += ["--guidance", "3", "--sampler", "euler_ancestral", "--trajectory", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [prompt] * 2 + ["a blue square"] * 2
    # a prompt naming a shapes figure's attributes carries them, for trainer.eval.shapes
    assert lines[0]["attributes"] == {"size": "small", "color": "red", "shape": "circle", "position": "top left"}
    assert "attributes" not in lines[2]
    assert [line["seed"] for line in lines] == [0, 1, 2, 3]
    assert all((out / line["file"]).is_file() for line in lines)
    assert (out / "grid.png").is_file() and (out / "0000_trajectory.png").is_file()
    from PIL import Image

    strip = Image.open(out / "0000_trajectory.png")
    assert strip.size == (32 * 4, 32)  # 3 steps + the final image, side by side

    img2img = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sample.py"), str(checkpoint), "--prompt", "x"]
        + ["--init-image", str(out / "0000.png"), "--strength", "0.5", "--steps", "4", "--out", str(tmp_path / "i2i")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert img2img.returncode == 0, img2img.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sample.py"), str(checkpoint), "--prompt", "x", "--sampler", "nope"]
        + ["--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "unknown sampler 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_cached_latents_train_and_a_stale_cache_is_refused(stages: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "cache_latents.py"), "--autoencoder", str(stages / "vae.safetensors")]
        + ["--text-encoder", str(stages / "clip"), "--urls", str(stages / "shards" / "train.manifest.json")]
        + ["--image-size", "32", "--batch-size", "8", "--out", str(cache)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cached 16 samples" in result.stdout
    task = make_task(stages)
    data = ShardDataModule(
        train={"urls": str(cache / "train.manifest.json")}, batch_size=4, num_workers=0, image_size=32
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["latents"].shape == (4, 4, 16, 16) and batch["context"].shape == (4, 16, 64)
    latents, context = task.latents_and_context(batch, drop_captions=False)
    assert latents.dtype == torch.float32 and torch.equal(context, batch["context"].float())
    # caption dropout with cached embeddings: dropped rows become the empty caption's, the others stay cached
    task.hparams.caption_dropout = 0.5
    torch.manual_seed(0)  # dropout draws from torch's generator, whose state checkpoints keep
    expected_drops = (torch.rand(4) < 0.5).tolist()
    torch.manual_seed(0)
    _, dropped = task.latents_and_context(batch, drop_captions=True)
    empty = task.text_encoder.encode([""])[0]
    assert any(expected_drops) and not all(expected_drops)  # seed 0 drops some rows, not all
    for row, drop in enumerate(expected_drops):
        assert torch.equal(dropped[row], empty if drop else batch["context"][row].float())
    # the empty caption is encoded on the first step, dropped rows or not (under FSDP the text encoder's units
    # gather across ranks, and each rank draws its own dropout), and only then: the encoder is frozen
    task.hparams.caption_dropout = 1e-9
    task._empty_context = None
    encoded = []
    encode = task.text_encoder.encode
    task.text_encoder.encode = lambda captions: encoded.append(captions) or encode(captions)
    _, kept = task.latents_and_context(batch, drop_captions=True)
    task.latents_and_context(batch, drop_captions=True)
    del task.text_encoder.encode
    assert encoded == [[""]] and torch.equal(kept, batch["context"].float())
    task.hparams.caption_dropout = 0.5
    # a training caption transform cannot reach cached embeddings: refused, not ignored
    task._trainer = SimpleNamespace(datamodule=SimpleNamespace(caption_transform=shapes.AttributeCaptions()))
    with pytest.raises(ConfigError, match="data.caption_transform .* cached latents with text embeddings"):
        task.latents_and_context(batch, drop_captions=True)
    task.latents_and_context(batch, drop_captions=False)  # validation captions are never transformed
    task._trainer = None
    # the captions themselves are transformed, for a text encoder that trains (encoded live)
    shouting = ShardDataModule(
        train={"urls": str(cache / "train.manifest.json")},
        batch_size=4,
        num_workers=0,
        image_size=32,
        caption_transform=lambda caption, meta, rng: caption.upper(),
    )
    shouting.setup("fit")
    assert [c.upper() for c in batch["caption"]] == next(iter(shouting.train_dataloader()))["caption"]
    timesteps = torch.tensor([10, 500, 900, 999])
    assert torch.isfinite(task.diffusion_loss(latents, context, timesteps, torch.randn_like(latents))).all()

    other = tmp_path / "other_vae.safetensors"
    torch.manual_seed(123)
    export_vae(AutoencoderKL.from_config(AE), other, scale_factor=0.5, config=AE)
    stale = LatentDiffusionTask(UNET, {"checkpoint": str(other)}, {"source": str(stages / "clip")}, ema_decay=None)
    with pytest.raises(ConfigError, match="stale cache"):
        stale.latents_and_context(batch, drop_captions=False)


def test_only_a_task_that_reads_tokens_has_its_loaders_tokenize(stages: Path) -> None:
    from trainer.tasks.clip import CLIPTask
    from trainer.train import data_tokenizer

    # the LDM encodes its captions itself (after caption dropout; on cached embeddings not at all): tokens made in
    # its loader workers would be thrown away
    assert data_tokenizer(make_task(stages)) is None
    tokenizer = data_tokenizer(CLIPTask({"name": "ldm-test-clip-task", "config": CLIP, "pretrained": None}))
    assert tokenizer is not None and tokenizer(["a red circle"]).shape == (1, CLIP["text_cfg"]["context_length"])


@pytest.mark.slow
def test_a_tiny_ldm_overfits_a_few_shapes_images(tmp_path: Path) -> None:
    """Four shapes images with distinct captions: after training on just them, the loss has fallen
    far below where it started, and sampling each caption gives back (nearly) its own image."""
    torch.manual_seed(0)
    clip, _ = build_clip("ldm-test-clip", CLIP)
    export_clip(clip, "ldm-test-clip", CLIP, tmp_path / "clip")
    autoencoder = AutoencoderKL.from_config(AE).eval()
    with torch.no_grad():  # a trained autoencoder's posterior is narrow; a random one's is not (log-variance ~0),
        autoencoder.quant_conv.bias[AE["embed_dim"] :] = -20.0  # and its samples would bury the images in noise
    images, captions = [], []
    with ShardWriter(tmp_path / "shards", "train", 100, image_format="png") as writer:
        for index in range(4):
            attributes = shapes.sample_attributes(random.Random(index))
            caption = shapes.make_caption(attributes, 0)
            image = shapes.render(attributes, 32)
            writer.write(f"{index:02d}", image, caption, attributes)
            captions.append(caption)
            images.append(torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1)
    assert len(set(captions)) == 4
    with torch.no_grad():  # latents of unit variance, as the real pipeline gets from its scale factor
        scale = 1.0 / autoencoder.encode(torch.stack(images)).mode().std().item()
    export_vae(autoencoder, tmp_path / "vae.safetensors", scale_factor=scale, config=AE)
    task = make_task(
        tmp_path,
        ema_decay=None,
        caption_dropout=0.0,
        optimizer={"lr": 1e-3, "weight_decay": 0.0},
        scheduler={"warmup_steps": 20},
    )
    data = ShardDataModule(
        train={"urls": str(tmp_path / "shards" / "train.manifest.json")},
        batch_size=4,
        num_workers=0,
        image_size=32,
        normalize="symmetric",
        shuffle_buffer=1,
    )
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        max_steps=1000,  # about a minute on 2 cores
        accelerator="cpu",
        default_root_dir=tmp_path,  # the task exports there at the end
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    trainer.fit(task, datamodule=data)
    start, end = np.mean(losses[:20]), np.mean(losses[-50:])
    assert end < 0.1 * start, (start, end)  # measured: 0.91 -> 0.029

    pipe = task.pipeline(use_ema=False)
    with torch.no_grad():
        targets = pipe.decode_latents(pipe.encode_images(torch.stack(images)))
        samples = pipe.generate(
            captions, steps=30, guidance=1.0, sampler="ddim", seeds=[0, 1, 2, 3], height=32, width=32
        )
    distances = torch.cdist(samples.flatten(1), targets.flatten(1))  # (sample, target)
    own = distances.diagonal()
    others = (distances + torch.eye(4) * 1e9).min(dim=1).values
    assert (own < 0.9 * others).all(), distances  # measured: own 13-19, others 22-24


def test_task_compile_compiles_the_unet_in_place_to_the_same_loss_and_gradients(stages: Path) -> None:
    """aot_eager traces forward and backward as inductor would, without a C++ compiler; the parameter names (so
    checkpoints and exports) stay the plain UNet's, and the EMA copy stays eager."""
    torch.manual_seed(0)
    eager = make_task(stages)
    compiled = make_task(stages, compile={"backend": "aot_eager", "dynamic": False})
    compiled.load_state_dict(eager.state_dict())
    assert compiled.unet._compiled_call_impl is not None and eager.unet._compiled_call_impl is None
    assert compiled.ema_unet.module._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    latents, context = torch.randn(2, 4, 16, 16), torch.randn(2, 16, 64)
    timesteps, noise = torch.tensor([10, 900]), torch.randn(2, 4, 16, 16)
    losses = [task.diffusion_loss(latents, context, timesteps, noise).mean() for task in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = [torch.cat([p.grad.flatten() for p in task.unet.parameters()]) for task in (eager, compiled)]
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def _fsdp_rank(rank: int, stages: Path, port: int, results: Path) -> None:
    """One rank of test_fsdp_shards_the_ldm_and_its_ema_and_samples_the_grid_on_every_rank."""
    import os

    import torch.distributed as dist
    import yaml
    from pytorch_lightning.plugins.precision import Precision
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from trainer.strategies import full_parameters, import_class

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    task = make_task(stages)
    wrap = yaml.safe_load((REPO / "configs" / "trainer" / "fsdp.yaml").read_text())["strategy"]["wrap"]
    task.forward = lambda *args: task.diffusion_loss(*args).mean()  # what Lightning routes through the root
    policy = ModuleWrapPolicy({import_class(p) for p in wrap})
    root = FSDP(task, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    strategy = FSDPStrategy()
    strategy.model = root
    optimizer = torch.optim.AdamW([p for p in root.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(rank)
    snapshots = []
    for _ in range(2):
        latents, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
        context = torch.randn(2, 16, 64, generator=generator)
        root(latents, context, torch.tensor([10, 900]), noise).backward()
        optimizer.step()
        optimizer.zero_grad()
        task.ema_unet.update_parameters(task.unet)  # each rank its own shards of both
        with full_parameters(strategy):
            snapshots.append(
                (
                    torch.cat([p.detach().flatten() for p in task.unet.parameters()]),
                    torch.cat([p.detach().flatten() for p in task.ema_unet.module.parameters()]),
                )
            )
    with full_parameters(strategy):
        images, _ = task.sample_grid()
    # the task's own path, as on_validation_epoch_end takes it on every rank under FSDP: rank 0 saves the grid
    task._trainer = SimpleNamespace(
        strategy=strategy,
        is_global_zero=rank == 0,
        default_root_dir=str(results / f"run{rank}"),
        loggers=[],
        global_step=2,
        precision_plugin=Precision(),
    )
    task.log_sample_grid()
    torch.save({"snapshots": snapshots, "images": images}, results / f"rank{rank}.pt")
    # the UNet and its EMA alone, as the frozen stages' embedding tables can leave both wholly on one rank above:
    # the EMA updates shard by shard only because the two are units of one layout (UNetModel is in the wrap list)
    from torch.optim.swa_utils import AveragedModel

    from trainer.models.unet import UNetModel
    from trainer.tasks.optimization import ema_multi_avg_fn

    pair = torch.nn.ModuleDict({"unet": UNetModel.from_config(UNET)})
    pair["ema"] = AveragedModel(pair["unet"], multi_avg_fn=ema_multi_avg_fn(0.9), use_buffers=True)
    pair["ema"].requires_grad_(False)
    pair.forward = lambda *args: pair["unet"](*args).mean()
    root = FSDP(pair, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    root(latents, torch.tensor([10, 900]), context).backward()
    pair["ema"].update_parameters(pair["unet"])
    dist.destroy_process_group()


@pytest.mark.distributed
def test_fsdp_shards_the_ldm_and_its_ema_and_samples_the_grid_on_every_rank(stages: Path, tmp_path: Path) -> None:
    """trainer=fsdp's wrap list on 2 CPU ranks (gloo; Lightning runs FSDP on GPUs only, and these are the parts it
    leaves to the task): the EMA updates shard by shard, because the UNet and its copy are units of one layout, and
    the sample grid, whose modules run outside the root's forward, samples inside full_parameters on every rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(stages, port, tmp_path), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    (unet1, ema1), (unet2, ema2) = ranks[0]["snapshots"]
    assert not torch.equal(unet1, unet2)  # it trained
    torch.testing.assert_close(ema1, unet1)  # the first update copies the weights
    weight = 1 - min(0.9, 2 / 11)  # the second: the warmup's share of the new weights
    torch.testing.assert_close(ema2, ema1 + weight * (unet2 - ema1), rtol=1e-5, atol=1e-6)
    for key in ("snapshots", "images"):  # every rank sees the same whole model and samples the same grid
        torch.testing.assert_close(ranks[1][key], ranks[0][key])
    assert ranks[0]["images"].shape == (2, 3, 32, 32) and torch.isfinite(ranks[0]["images"]).all()
    assert (tmp_path / "run0" / "images" / "samples_00000002.png").is_file()
    assert not (tmp_path / "run1").exists()
