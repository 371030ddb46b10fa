"""Text-to-image and image-to-image with a trained latent diffusion model.

    prompts -> tokens -> per-token embeddings -> noise -> sampler steps (UNet + guidance) -> VAE decode

The pieces come from the rest of the package: the frozen text encoder, the UNet behind one
:class:`~trainer.diffusion.DiscreteDenoiser` (the only place preconditioning lives), classifier-free
guidance with an optional negative prompt, any sampler of :data:`~trainer.diffusion.SAMPLERS`, and
the autoencoder's decoder. Used by the training task for its validation grids and by
``tools/sample.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trainer.data.buckets import require_multiple
from trainer.diffusion import SAMPLERS, DiscreteDenoiser, GuidedDenoiser, get_sigmas, img2img_start
from trainer.errors import ConfigError


@dataclass
class LatentDiffusion:
    """The modules of a trained LDM and the constants that tie them together."""

    unet: nn.Module
    autoencoder: nn.Module
    text_encoder: nn.Module
    alphas_cumprod: torch.Tensor
    objective: str = "eps"
    scale_factor: float = 1.0
    resolution: int = 64  # the image size it was trained at: the default for sampling

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    @property
    def latent_stride(self) -> int:
        """Image sides must be multiples of this: the autoencoder's downsampling times the UNet's."""
        return self.downsample_factor * getattr(self.unet, "downsample_factor", 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (the posterior's mode)."""
        return self.autoencoder.encode(images).mode() * self.scale_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.autoencoder.decode(latents / self.scale_factor).clamp(-1, 1)

    def denoiser(self) -> DiscreteDenoiser:
        def unet(x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.unet(x, timesteps, context)

        return DiscreteDenoiser(unet, self.alphas_cumprod.to(self.device), self.objective)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        negative_prompts: Sequence[str] | None = None,
        height: int = 64,
        width: int = 64,
        steps: int = 30,
        guidance: float = 5.0,
        sampler: str = "dpmpp_2m",
        schedule: str = "karras",
        seeds: Sequence[int] | None = None,
        init_images: torch.Tensor | None = None,
        strength: float = 0.75,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        sampler_options: dict | None = None,
    ) -> torch.Tensor:
        """Sample one image per prompt; returns (B, 3, height, width) in [-1, 1]. Width and height may differ; each
        must be a multiple of :attr:`latent_stride` (a ValueError says which is not).

        ``seeds`` (one per prompt) make each image reproducible on its own, whatever the batch.
        With ``init_images`` ((B, 3, H, W) in [-1, 1]) this is image-to-image: the images are
        encoded, noised to the level ``strength`` of the way up the schedule, and denoised from there.
        ``callback(step, x, denoised)`` sees every step (for trajectories).
        """
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        factor, stride = self.downsample_factor, self.latent_stride
        require_multiple(
            width, height, stride, f"sampled images (latent stride: autoencoder {factor} x UNet {stride // factor})"
        )
        count = len(prompts)
        negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * count
        if len(negative_prompts) != count:
            raise ConfigError("give one negative prompt per prompt (or none)")
        seeds = list(seeds) if seeds is not None else list(range(count))
        device = self.device
        context = self.text_encoder.encode(list(prompts)).to(device)
        uncond_context = self.text_encoder.encode(negative_prompts).to(device)

        sigmas = get_sigmas(self.alphas_cumprod, steps, schedule).to(device)
        channels = self.unet.out_channels
        shape = (channels, height // factor, width // factor)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
        generator = torch.Generator(device="cpu").manual_seed(seeds[0])
        if init_images is not None:
            latents = self.encode_images(init_images.to(device))
            x, sigmas = img2img_start(latents, sigmas, strength, noise=noise)
        else:
            x = noise * sigmas[0]
        denoiser = GuidedDenoiser(self.denoiser(), guidance)
        extra_args = {"context": context, "uncond_context": uncond_context}
        if len(sigmas) > 1:
            x = SAMPLERS[sampler](
                denoiser,
                x,
                sigmas,
                extra_args=extra_args,
                generator=generator,
                callback=callback,
                **(sampler_options or {}),
            )
        return self.decode_latents(x)


def load_lora(pipeline: LatentDiffusion, adapters: Sequence[tuple[str, float]]) -> list[str]:
    """Add LoRA adapter files, each with its weight (``(path, weight)`` pairs, as ``FILE:0.8`` on the command line),
    to the pipeline's UNet and text encoder, all active at once (:func:`trainer.lora.load_adapters`). A weight scales
    the adapter's delta; 0 leaves the model as it was. Returns the new adapter names."""
    from trainer.lora import load_adapters

    return load_adapters({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder}, adapters)


def load_checkpoint_pipeline(
    checkpoint: str, use_ema: bool = True, device: str = "cpu", lora: Sequence[tuple[str, float]] = ()
) -> LatentDiffusion:
    """A :class:`LatentDiffusion` from one of our latent diffusion checkpoints (.ckpt).

    The task is rebuilt from the hyperparameters stored in the checkpoint (so the autoencoder and
    text encoder files it names must still exist) and then gets the checkpoint's weights. A LoRA run's
    checkpoint comes with its adapters active; ``lora`` adds adapter files with weights (see :func:`load_lora`).
    """
    from trainer.checkpoints import load_lightning_checkpoint
    from trainer.tasks.latent_diffusion import LatentDiffusionTask

    state = load_lightning_checkpoint(checkpoint)
    hparams = state.get("hyper_parameters", {})
    if "unet" not in hparams:
        raise ConfigError(f"{checkpoint} is not a latent diffusion checkpoint (no 'unet' in its hyperparameters)")
    hparams = {**hparams, "pretrained": None, "compile": None}  # sampling runs eager: no compile per batch size
    task = LatentDiffusionTask(**hparams)
    task.load_state_dict(state["state_dict"], strict=True)
    if lora:
        load_lora(task.pipeline(use_ema=use_ema), lora)
    return task.to(device).eval().pipeline(use_ema=use_ema)
