"""Stage 3: the text-conditioned latent diffusion UNet.

Frozen around it: the autoencoder of stage 2 (latents = encoder mode or sample x its scale factor)
and the text encoder of stage 1 (per-token hidden states the UNet cross-attends to). Latents and
text embeddings are computed on the fly, or read from cached shards (``tools/cache_latents.py``)
whose tag must match these frozen models.

Training: t ~ U{0..T-1}, x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (optionally offset noise), the
UNet predicts eps, v or x0, MSE with optional min-SNR-gamma weighting; captions are replaced by the
empty caption with probability ``caption_dropout`` so the model also learns the unconditional
prediction that classifier-free guidance needs. An EMA of the UNet samples the validation grids.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainer.checkpoints import (
    load_strict,
    load_vae_weights,
    read_vae_config,
    read_weights,
    save_safetensors,
    select_prefixed,
)
from trainer.diffusion import alphas_cumprod as cumulative_alphas
from trainer.diffusion import (
    beta_schedule,
    diffusion_loss,
    min_snr_weight,
    offset_noise,
    q_sample,
    rescale_zero_terminal_snr,
    snr,
    training_target,
)
from trainer.errors import ConfigError
from trainer.generate import LatentDiffusion
from trainer.latent_cache import check_cache_tags, latent_tag
from trainer.models.autoencoder import AutoencoderKL
from trainer.models.text_encoder import TextEncoder
from trainer.models.unet import UNetModel
from trainer.tasks.optimization import adamw_with_schedule

log = logging.getLogger(__name__)
# The frozen autoencoder and text encoder stay in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
OBJECTIVES = ("eps", "v", "x0")
UNET_PREFIXES = ("model.diffusion_model.", "ema_unet.module.", "unet.")


class LatentDiffusionTask(pl.LightningModule):
    def __init__(
        self,
        unet: Mapping[str, Any],
        autoencoder: Mapping[str, Any],
        text_encoder: Mapping[str, Any],
        schedule: Mapping[str, Any] | None = None,
        objective: str = "eps",
        min_snr_gamma: float | None = None,
        offset_noise: float = 0.0,
        caption_dropout: float = 0.1,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        ema_decay: float | None = 0.9999,
        pretrained: str | None = None,
        gradient_checkpointing: bool | None = None,
        channels_last: bool = False,
        validation: Mapping[str, Any] | None = None,
        export: bool = True,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ConfigError(f"task.objective must be one of {OBJECTIVES}, got {objective!r}")
        if not 0 <= caption_dropout <= 1:
            raise ConfigError(f"task.caption_dropout must be in [0, 1], got {caption_dropout}")
        self.save_hyperparameters()
        # frozen first stage and text encoder
        config = autoencoder.get("config") or (
            read_vae_config(autoencoder["checkpoint"]) if autoencoder.get("checkpoint") else None
        )
        if config is None:
            raise ConfigError(
                "task.autoencoder needs a config (e.g. the kl_f8 dict) unless its checkpoint is one of our exports"
            )
        self.autoencoder = AutoencoderKL.from_config(dict(config))
        stored_scale = None
        if autoencoder.get("checkpoint"):
            stored_scale = load_vae_weights(self.autoencoder, autoencoder["checkpoint"])
        scale = autoencoder.get("scale_factor") or stored_scale
        if scale is None:
            raise ConfigError(
                "no latent scale factor: the autoencoder checkpoint has none, so set task.autoencoder.scale_factor "
                "(0.18215 for the SD VAE)"
            )
        self.scale_factor = float(scale)
        self.posterior = autoencoder.get("posterior", "sample")
        if self.posterior not in ("sample", "mode"):
            raise ConfigError(f"task.autoencoder.posterior must be 'sample' or 'mode', got {self.posterior!r}")
        self.autoencoder.requires_grad_(False).eval()
        self.text_encoder = TextEncoder.from_source(
            text_encoder.get("source"),
            text_encoder.get("name"),
            text_encoder.get("config"),
            text_encoder.get("layer", "last"),
            text_encoder.get("final_norm", True),
        )
        self.tokenizer = self.text_encoder.tokenizer
        # the UNet, its schedule and EMA
        self.unet = UNetModel.from_config(dict(unet))
        if self.unet.context_dim != self.text_encoder.width:
            raise ConfigError(
                f"unet.context_dim ({self.unet.context_dim}) must equal the text encoder width ({self.text_encoder.width})"
            )
        if self.unet.in_channels != self.autoencoder.latent_channels:
            raise ConfigError(
                f"unet.in_channels ({self.unet.in_channels}) must equal the autoencoder's latent channels "
                f"({self.autoencoder.latent_channels})"
            )
        if pretrained:
            self.load_pretrained(pretrained)
        if gradient_checkpointing is not None:  # None keeps the UNet config's use_checkpoint
            self.unet.gradient_checkpointing = gradient_checkpointing
        if channels_last:
            self.unet.to_channels_last()
            self.autoencoder.to_channels_last()
        self.ema_unet = (
            AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            if ema_decay
            else None
        )
        schedule = {
            "name": "scaled_linear",
            "num_timesteps": 1000,
            "linear_start": 0.00085,
            "linear_end": 0.012,
            **(schedule or {}),
        }
        zero_terminal = schedule.pop("zero_terminal_snr", False)
        betas = beta_schedule(**schedule)
        if zero_terminal:
            betas = rescale_zero_terminal_snr(betas)
        self.register_buffer("alphas_cumprod", cumulative_alphas(betas).float(), persistent=False)
        self.optimizer_cfg = {"lr": 1e-4, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, **(optimizer or {})}
        self.scheduler_cfg = {"warmup_steps": 0, "total_steps": None, "min_lr_ratio": 1.0, **(scheduler or {})}
        self.validation_cfg = {
            "prompts": ["a photo"],
            "negative_prompt": "",
            "seeds": None,
            "steps": 25,
            "guidance": 4.0,
            "sampler": "dpmpp_2m",
            "schedule": "karras",
            "height": None,
            "width": None,
            "loss_buckets": 10,
            **(validation or {}),
        }
        self._caption_rng = random.Random(0)
        self._bucket_losses: list[torch.Tensor] = []
        self._cache_tags: tuple[str, str] | None = None

    # -- weights ----------------------------------------------------------------------------------

    def load_pretrained(self, path: str) -> None:
        """Released SD weights (.safetensors, or .ckpt read with weights_only) or one of our checkpoints:
        the UNet from ``model.diffusion_model.``, and the VAE from ``first_stage_model.`` when the
        autoencoder config names no checkpoint of its own."""
        state, _ = read_weights(path)
        load_strict(self.unet, select_prefixed(state, *UNET_PREFIXES), f"UNet weights in {path}")
        if not self.hparams.autoencoder.get("checkpoint") and any(k.startswith("first_stage_model.") for k in state):
            load_strict(self.autoencoder, select_prefixed(state, "first_stage_model."), f"VAE weights in {path}")

    def export(self, path: str | Path) -> Path:
        """One safetensors file in the original layout: ``model.diffusion_model.*`` (the EMA UNet when
        EMA is on) + ``first_stage_model.*``, the scale factor in the metadata."""
        unet = self.ema_unet.module if self.ema_unet is not None else self.unet
        tensors = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
        tensors.update({f"first_stage_model.{k}": v for k, v in self.autoencoder.state_dict().items()})
        metadata = {"format": "pt", "scale_factor": repr(self.scale_factor), "objective": self.hparams.objective}
        return save_safetensors(tensors, path, metadata)

    def on_train_end(self) -> None:
        if self.hparams.export and self.trainer.is_global_zero:
            out = self.export(Path(self.trainer.default_root_dir) / "export" / "ldm.safetensors")
            log.info("exported the UNet + VAE in the SD layout to %s", out)

    # -- training ---------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> LatentDiffusionTask:
        super().train(mode)
        self.autoencoder.eval()  # frozen modules stay in eval mode
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def latents_and_context(self, batch: dict, drop_captions: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents, text context) for a batch of images and captions, or from cached entries."""
        if "latents" in batch:
            self._check_cache(batch["meta"][0])
            latents = batch["latents"].float()
        else:
            posterior = self.autoencoder.encode(batch["image"])
            latents = (posterior.sample() if self.posterior == "sample" else posterior.mode()) * self.scale_factor
        if "context" in batch and not drop_captions:
            return latents, batch["context"].float()
        captions = list(batch["caption"])
        if drop_captions and self.hparams.caption_dropout > 0:
            captions = ["" if self._caption_rng.random() < self.hparams.caption_dropout else c for c in captions]
        return latents, self.text_encoder.encode(captions)

    def _check_cache(self, meta: dict) -> None:
        if self._cache_tags is None:  # hashing the frozen weights once
            self._cache_tags = (latent_tag(self.autoencoder, self.scale_factor), self.text_encoder.fingerprint())
        check_cache_tags(meta, *self._cache_tags)

    def diffusion_loss(
        self, latents: torch.Tensor, context: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample (weighted) MSE between the UNet's prediction and the objective's target."""
        noisy = q_sample(latents, timesteps, noise, self.alphas_cumprod)
        prediction = self.unet(noisy, timesteps, context)
        target = training_target(self.hparams.objective, latents, noise, timesteps, self.alphas_cumprod)
        weight = None
        if self.hparams.min_snr_gamma:
            snr_t = snr(self.alphas_cumprod)[timesteps]
            weight = min_snr_weight(snr_t, self.hparams.min_snr_gamma, self.hparams.objective)
        return diffusion_loss(prediction, target, weight)  # (B,)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        latents, context = self.latents_and_context(batch, drop_captions=True)
        if self.hparams.channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(latents),), device=self.device)
        noise = offset_noise(latents.shape, self.hparams.offset_noise, device=self.device)
        loss = self.diffusion_loss(latents, context, timesteps, noise).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(latents))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema_unet is not None:
            self.ema_unet.update_parameters(self.unet)

    # -- evaluation -------------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss by timestep bucket: each sample at the middle timestep of every bucket, fixed noise."""
        latents, context = self.latents_and_context(batch, drop_captions=False)
        buckets, steps = self.validation_cfg["loss_buckets"], len(self.alphas_cumprod)
        generator = torch.Generator().manual_seed(batch_idx)
        losses = []
        for bucket in range(buckets):
            t = int((bucket + 0.5) * steps / buckets)
            timesteps = torch.full((len(latents),), t, device=self.device, dtype=torch.long)
            noise = torch.randn(latents.shape, generator=generator).to(self.device)
            losses.append(self.diffusion_loss(latents, context, timesteps, noise))
        self._bucket_losses.append(torch.stack(losses, dim=1))  # (B, buckets)

    def on_validation_epoch_end(self) -> None:
        if self._bucket_losses:
            per_bucket = torch.cat(self._bucket_losses).mean(dim=0)
            self._bucket_losses = []
            buckets = len(per_bucket)
            for bucket, value in enumerate(per_bucket):
                self.log(f"val/loss_t{bucket * 1000 // buckets:03d}", value, sync_dist=True)
            self.log("val/loss", per_bucket.mean(), sync_dist=True, prog_bar=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.log_sample_grid()

    def pipeline(self, use_ema: bool = True) -> LatentDiffusion:
        unet = self.ema_unet.module if use_ema and self.ema_unet is not None else self.unet
        resolution = self.validation_cfg["height"] or 8 * self.autoencoder.downsample_factor
        return LatentDiffusion(
            unet,
            self.autoencoder,
            self.text_encoder,
            self.alphas_cumprod,
            self.hparams.objective,
            self.scale_factor,
            int(resolution),
        )

    def sample_grid(self) -> tuple[torch.Tensor, list[str]]:
        """The fixed validation prompts with their fixed seeds, as images in [0, 1]."""
        cfg = self.validation_cfg
        prompts: Sequence[str] = cfg["prompts"]
        seeds = cfg["seeds"] or list(range(len(prompts)))
        pipeline = self.pipeline()
        images = pipeline.generate(
            prompts,
            negative_prompts=[cfg["negative_prompt"]] * len(prompts),
            height=cfg["height"] or pipeline.resolution,
            width=cfg["width"] or pipeline.resolution,
            steps=cfg["steps"],
            guidance=cfg["guidance"],
            sampler=cfg["sampler"],
            schedule=cfg["schedule"],
            seeds=seeds,
        )
        return (images + 1) / 2, list(prompts)

    def log_sample_grid(self) -> None:
        from torchvision.utils import make_grid, save_image

        was_training = self.unet.training
        self.unet.eval()
        images, prompts = self.sample_grid()
        self.unet.train(was_training)
        grid = make_grid(images.float().cpu(), nrow=min(len(images), 8))
        folder = Path(self.trainer.default_root_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, folder / f"samples_{self.global_step:08d}.png")
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/samples", grid, self.global_step)
            elif hasattr(logger, "log_image"):
                logger.log_image("val/samples", [grid], step=self.global_step, caption=[" | ".join(prompts)])

    # -- optimization -----------------------------------------------------------------------------

    def configure_optimizers(self):
        return adamw_with_schedule(
            self.unet.parameters(), self.optimizer_cfg, self.scheduler_cfg, self.trainer.max_steps
        )
