"""Stage 3: the text-conditioned latent diffusion UNet.

Frozen around it: the autoencoder of stage 2 (latents = encoder mode or sample x its scale factor)
and the text encoder of stage 1 (per-token hidden states the UNet cross-attends to). Latents and
text embeddings are computed on the fly, or read from cached shards (``tools/cache_latents.py``)
whose tag must match these frozen models.

Training: t ~ U{0..T-1}, x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise (optionally offset noise), the
UNet predicts eps, v or x0, MSE with optional min-SNR-gamma weighting; captions are replaced by the
empty caption with probability ``caption_dropout`` so the model also learns the unconditional
prediction that classifier-free guidance needs. An EMA of the UNet samples the validation grids.

LoRA (``lora``: rank, alpha, dropout, targets, and optionally ``text_encoder``; see :mod:`trainer.lora`): peft
adapters on the UNet (and the text encoder), everything else frozen; the optimizer steps only the adapters, the EMA
averages only them (its copy shares the frozen base weights with the UNet), and the end-of-run export is the adapter
file ``export/lora.safetensors`` instead of the full ``export/ldm.safetensors`` (merge it with
``tools/merge_lora.py``). Lightning checkpoints hold base and adapters and resume as usual.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import AveragedModel

from trainer.checkpoints import (
    load_strict,
    load_vae_weights,
    read_scale_factor,
    read_vae_config,
    read_weights,
    save_safetensors,
    select_prefixed,
)
from trainer.data.buckets import require_multiple, require_size_multiple
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
from trainer.lora import apply_lora, merge_adapters, parse_lora_config, save_adapters
from trainer.models.autoencoder import AutoencoderKL
from trainer.models.text_encoder import TextEncoder
from trainer.models.unet import UNetModel
from trainer.strategies import full_parameters, is_fsdp
from trainer.tasks.compilation import compile_in_place, forward_context
from trainer.tasks.optimization import adamw_with_schedule, ema_multi_avg_fn

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
        compile: Any = None,
        validation: Mapping[str, Any] | None = None,
        export: bool = True,
        lora: Mapping[str, Any] | None = None,
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
        elif pretrained:  # the VAE comes from the pretrained file (load_pretrained); our exports store its scale
            stored_scale = read_scale_factor(pretrained)
        scale = autoencoder.get("scale_factor") or stored_scale
        if scale is None:
            raise ConfigError(
                "no latent scale factor: the autoencoder's weights store none, so set task.autoencoder.scale_factor "
                "(0.18215 for the SD VAE)"
            )
        if stored_scale is not None and abs(float(scale) - stored_scale) > 1e-6 * abs(stored_scale):
            log.warning(
                "task.autoencoder.scale_factor=%s is used, but the autoencoder's weights store %s (the scale its "
                "latents were trained with); set task.autoencoder.scale_factor=null to use the stored one",
                scale,
                stored_scale,
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
        self.lora_specs = parse_lora_config(lora)  # {} for full fine-tuning
        if self.lora_specs:
            apply_lora(self.unet, self.lora_specs["unet"], "unet", source="task.lora")
            if self.text_encoder_trains:
                spec = self.lora_specs["text_encoder"]
                apply_lora(self.text_encoder, spec, "text_encoder", source="task.lora.text_encoder")
        if channels_last:
            self.unet.to_channels_last()
            self.autoencoder.to_channels_last()
        self.ema_unet = self._make_ema(ema_decay) if ema_decay else None
        compile_in_place(self.unet, compile)  # after the EMA copy, which stays eager
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
        self._bucket_losses: list[torch.Tensor] = []
        self._cache_tags: tuple[str, str] | None = None
        self._empty_context: torch.Tensor | None = None  # the frozen text encoder's empty caption, for dropout

    # -- weights ----------------------------------------------------------------------------------

    def load_pretrained(self, path: str) -> None:
        """Released SD weights (.safetensors, or .ckpt read with weights_only) or one of our checkpoints:
        the UNet from ``model.diffusion_model.``, and the VAE from ``first_stage_model.`` when the
        autoencoder config names no checkpoint of its own."""
        state, metadata = read_weights(path)
        trained_groups = metadata.get("unet_norm_num_groups")
        if trained_groups is not None and int(trained_groups) != self.unet.norm_num_groups:
            raise ConfigError(
                f"{path} holds a UNet trained with norm_num_groups={trained_groups}, but this run builds one with "
                f"{self.unet.norm_num_groups} (the weights would load, and compute something else): set "
                f"model.norm_num_groups={trained_groups}"
            )
        load_strict(self.unet, select_prefixed(state, *UNET_PREFIXES), f"UNet weights in {path}")
        if not self.hparams.autoencoder.get("checkpoint") and any(k.startswith("first_stage_model.") for k in state):
            load_strict(self.autoencoder, select_prefixed(state, "first_stage_model."), f"VAE weights in {path}")

    def export(self, path: str | Path) -> Path:
        """One safetensors file in the original layout: ``model.diffusion_model.*`` (the EMA UNet when
        EMA is on) + ``first_stage_model.*``, the scale factor in the metadata. Under LoRA, the UNet with its
        adapters merged in (a copy: the task keeps its adapters)."""
        unet = self.ema_unet.module if self.ema_unet is not None else self.unet
        if self.lora_specs:
            unet = merge_adapters(copy.deepcopy(unet))
        tensors = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
        tensors.update({f"first_stage_model.{k}": v for k, v in self.autoencoder.state_dict().items()})
        metadata = {"format": "pt", "scale_factor": repr(self.scale_factor), "objective": self.hparams.objective}
        metadata["unet_norm_num_groups"] = str(unet.norm_num_groups)  # changes no shape: checked on loading
        return save_safetensors(tensors, path, metadata)

    def export_lora(self, path: str | Path) -> Path:
        """The adapters alone (:func:`trainer.lora.save_adapters`): the UNet's (from the EMA when EMA is on) and the
        text encoder's when it has some; the objective and the base weights' file in the metadata."""
        unet = self.ema_unet.module if self.ema_unet is not None else self.unet
        parts = {"unet": (unet, self.lora_specs["unet"])}
        if self.text_encoder_trains:
            parts["text_encoder"] = (self.text_encoder, self.lora_specs["text_encoder"])
        metadata = {"objective": self.hparams.objective, "base": str(self.hparams.pretrained or "")}
        return save_adapters(path, parts, metadata=metadata)

    def on_train_end(self) -> None:
        if self.hparams.export and self.trainer.is_global_zero:
            folder = Path(self.trainer.default_root_dir) / "export"
            if self.lora_specs:  # the base is unchanged: the adapters are the whole result
                out = self.export_lora(folder / "lora.safetensors")
                log.info("exported the LoRA adapters to %s (merge them with tools/merge_lora.py)", out)
                return
            out = self.export(folder / "ldm.safetensors")
            log.info("exported the UNet + VAE in the SD layout to %s", out)

    @property
    def text_encoder_trains(self) -> bool:
        """Whether the text encoder has LoRA adapters to train (it is frozen otherwise)."""
        return "text_encoder" in self.lora_specs

    def _make_ema(self, decay: float) -> AveragedModel:
        """An EMA of the UNet. Under LoRA it averages only what trains: its copy of the UNet shares the frozen base
        parameters with the UNet itself (no second copy in memory; one in checkpoints), and the update skips them."""
        if not self.lora_specs:
            ema = AveragedModel(self.unet, multi_avg_fn=ema_multi_avg_fn(decay), use_buffers=True)
        else:
            ema = AveragedModel(torch.nn.Identity(), multi_avg_fn=_ema_of_unshared(decay), use_buffers=True)
            frozen = {id(p): p for p in self.unet.parameters() if not p.requires_grad}
            ema.module = copy.deepcopy(self.unet, memo=frozen)  # what AveragedModel does, minus the frozen copies
        # averaged, never trained: a copy that asked for gradients would stop DDP ("parameters that were not
        # used in producing the loss")
        return ema.requires_grad_(False)

    # -- training ---------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> LatentDiffusionTask:
        super().train(mode)
        self.autoencoder.eval()  # frozen modules stay in eval mode
        self.text_encoder.eval()
        return self

    def check_image_size(self, size: int, key: str) -> None:
        """Before any data is read: image sides must be multiples of the latent stride."""
        require_size_multiple(
            size,
            self.autoencoder.downsample_factor * self.unet.downsample_factor,
            key,
            "the latent stride: autoencoder downsampling x UNet levels",
        )

    @torch.no_grad()
    def latents_and_context(self, batch: dict, drop_captions: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents, text context) for a batch of images and captions, or from cached entries."""
        if "latents" in batch:
            self._check_cache(batch["meta"][0])
            latents = batch["latents"].float()
        else:
            height, width = batch["image"].shape[-2:]  # any aspect ratio (data.buckets), at the latent stride
            stride = self.autoencoder.downsample_factor * self.unet.downsample_factor
            require_multiple(
                width, height, stride, "training images (data.image_size, or data.buckets' sizes and step)"
            )
            posterior = self.autoencoder.encode(batch["image"])
            latents = (posterior.sample() if self.posterior == "sample" else posterior.mode()) * self.scale_factor
        captions = list(batch["caption"])
        if drop_captions and self.hparams.caption_dropout > 0:
            # torch's generator, like the noise and timesteps: saved with every rank's RNG states for exact
            # resume, and each rank's own (trainer.callbacks.resume)
            dropped = (torch.rand(len(captions)) < self.hparams.caption_dropout).tolist()
        else:
            dropped = [False] * len(captions)
        if "context" in batch and not self.text_encoder_trains:
            # cached: only the dropped captions' rows change, to the empty caption's embedding
            if drop_captions:
                self._refuse_caption_transform()
            context = batch["context"].float()
            if drop_captions and self.hparams.caption_dropout > 0:
                if self._empty_context is None:
                    # once, on the first step, dropped rows or not: ranks draw their own dropout, and under FSDP
                    # the text encoder's units gather across ranks, which must all take part
                    self._empty_context = self.text_encoder.encode([""])
                rows = torch.tensor(dropped, device=context.device)[:, None, None]
                context = torch.where(rows, self._empty_context.to(context), context)
            return latents, context
        captions = ["" if drop else caption for drop, caption in zip(dropped, captions, strict=True)]
        if self.text_encoder_trains and self.training:  # its adapters learn: gradients through the text encoder
            with torch.enable_grad():
                return latents, self.text_encoder(self.text_encoder.tokenizer(captions).to(self.device))
        return latents, self.text_encoder.encode(captions)

    def _refuse_caption_transform(self) -> None:
        """Cached text embeddings were computed from the captions as written: a training caption transform
        (``data.caption_transform``) cannot reach them, and would be ignored without a word."""
        transform = getattr(getattr(self._trainer, "datamodule", None), "caption_transform", None)
        if transform is not None:
            raise ConfigError(
                f"data.caption_transform ({transform!r}) is set, but the training data are cached latents with "
                "text embeddings (tools/cache_latents.py), computed from the captions as written: the transform "
                "would be ignored. Set data.caption_transform=null, or train from the images (data.train.urls "
                "of the image shards), or cache the latents alone (tools/cache_latents.py without --text-encoder)."
            )

    def _check_cache(self, meta: dict) -> None:
        if self._cache_tags is None:  # hashing the frozen weights once; a text encoder that trains has no fixed tag
            text_tag = None if self.text_encoder_trains else self.text_encoder.fingerprint()
            self._cache_tags = (latent_tag(self.autoencoder, self.scale_factor), text_tag)
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

    def optimizer_step(self, *args, **kwargs) -> None:
        # the EMA follows each optimizer step (once per accumulated batch), before any callback's
        # on_train_batch_end: a checkpoint written there holds the EMA of the step it names, so resume is exact
        super().optimizer_step(*args, **kwargs)
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
        if not self.trainer.sanity_checking and (self.trainer.is_global_zero or is_fsdp(self.trainer.strategy)):
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
        """Sample the grid in the training precision and save and log it (rank 0). Under FSDP every rank samples,
        inside ``summon_full_params``: the modules are called outside the root's forward, where the parameters
        outside the wrapped units are each rank's flat shards, and gathering them needs every rank."""
        from torchvision.utils import make_grid, save_image

        was_training = self.unet.training
        self.unet.eval()
        with full_parameters(self.trainer.strategy), forward_context(self):
            images, prompts = self.sample_grid()
        self.unet.train(was_training)
        if not self.trainer.is_global_zero:
            return
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

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps: the UNet, or under LoRA only the adapters (of the UNet and the text encoder)."""
        return [p for module in (self.unet, self.text_encoder) for p in module.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return adamw_with_schedule(
            self.trainable_parameters(), self.optimizer_cfg, self.scheduler_cfg, self.trainer.max_steps
        )


def _ema_of_unshared(decay: float):
    """EMA update (torch's ``get_ema_multi_avg_fn``) of the parameter pairs that are not one shared tensor: under
    LoRA the frozen base is shared between the UNet and its EMA, and averaging it with itself would only cost time."""
    update = ema_multi_avg_fn(decay)

    def multi_avg_fn(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        pairs = [(a, c) for a, c in zip(averaged, current, strict=True) if a.data_ptr() != c.data_ptr()]
        if pairs:
            update([a for a, _ in pairs], [c for _, c in pairs], num_averaged)

    return multi_avg_fn
