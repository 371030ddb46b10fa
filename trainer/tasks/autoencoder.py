"""Stage 2: the KL autoencoder, trained with reconstruction + KL (+ LPIPS) + a PatchGAN discriminator.

The loss follows latent-diffusion's ``LPIPSWithDiscriminator``:

    nll   = (|x - x̂| [+ w_p · LPIPS(x, x̂)]) / exp(logvar) + logvar      (logvar: one learned scalar)
    L_ae  = mean_b Σ nll + w_kl · mean_b KL(q(z|x) || N(0, I)) + λ · f(step) · (-mean D(x̂))
    L_d   = f(step) · ½ (mean relu(1 - D(x)) + mean relu(1 + D(x̂)))          (hinge)

with λ the adaptive weight ||∇_last nll|| / (||∇_last g|| + 1e-4) (clamped to [0, 1e4], times
``disc_weight``) taken at the decoder's last layer, and f(step) = 0 before ``disc_start``.

Two optimizers, stepped through Lightning's manual optimization. The discriminator's step goes
through the strategy (precision and scaler handled) but not through Lightning's optimizer wrapper,
so ``trainer.global_step`` counts one step per batch, as in the other stages. ``scheduler`` (optional) gives the
autoencoder's optimizer a warmup-then-cosine learning rate, stepped by hand after each of its steps.

``trainable="decoder"`` fine-tunes only the decoder side (decoder, post_quant_conv, logvar) of pretrained weights:
the encoder and quant_conv stay frozen, so latents an LDM was trained on keep their meaning, and the scale factor
stored with the pretrained weights is kept instead of measured (as Stable Diffusion's fine-tuned VAE decoders).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy
from torch.optim.swa_utils import AveragedModel

from trainer.data.buckets import require_multiple, require_size_multiple
from trainer.errors import ConfigError
from trainer.models.autoencoder import AutoencoderKL
from trainer.models.discriminator import PatchDiscriminator
from trainer.tasks.compilation import compile_in_place
from trainer.tasks.optimization import build_adamw, ema_multi_avg_fn, warmup_cosine

log = logging.getLogger(__name__)
RECONSTRUCTION = ("l1", "l2")
TRAINABLE = ("all", "decoder")


# -- the loss terms, as pure functions -----------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adopt_weight(weight: float, step: int, start: int) -> float:
    """The discriminator's factor: 0 before ``start``, ``weight`` from then on."""
    return weight if step >= start else 0.0


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Balance the GAN term against reconstruction by their gradient norms at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1], per image: 10 log10(1 / MSE) on the [0, 1] scale."""
    mse = ((x - y) / 2).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


class AutoencoderTask(pl.LightningModule):
    def __init__(
        self,
        model: Mapping[str, Any],
        reconstruction: str = "l1",
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        perceptual_weight: float = 1.0,
        lpips_weights: str | None = None,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        grad_clip: float | None = None,
        ema_decay: float | None = None,
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile: Any = None,
        pretrained: str | None = None,
        scale_factor_samples: int = 512,
        log_images: int = 8,
        trainable: str = "all",
    ):
        super().__init__()
        if reconstruction not in RECONSTRUCTION:
            raise ConfigError(f"task.reconstruction must be one of {RECONSTRUCTION}, got {reconstruction!r}")
        if trainable not in TRAINABLE:
            raise ConfigError(f"task.trainable must be one of {TRAINABLE}, got {trainable!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.autoencoder = AutoencoderKL.from_config(dict(model), gradient_checkpointing=gradient_checkpointing)
        stored_scale = None
        if pretrained:
            from trainer.checkpoints import load_vae_weights

            stored_scale = load_vae_weights(self.autoencoder, pretrained)
        # decoder only: the encoder and quant_conv stay frozen, so the latents (and their scale) that an LDM was
        # trained on stay valid; the decoder, post_quant_conv and logvar train
        self.keeps_latents = trainable == "decoder"
        if self.keeps_latents:
            if not pretrained:
                log.warning("task.trainable=decoder without task.pretrained: the encoder stays at its random init")
            self.autoencoder.encoder.requires_grad_(False)
            self.autoencoder.quant_conv.requires_grad_(False)
        if channels_last:
            self.autoencoder.to_channels_last()
        self.logvar = torch.nn.Parameter(torch.tensor(float(logvar_init)))
        self.discriminator = PatchDiscriminator(self.autoencoder.out_channels, disc_channels, disc_layers)
        self.lpips = None
        if perceptual_weight > 0 and lpips_weights:
            from trainer.models.lpips import LPIPS

            self.lpips = LPIPS(lpips_weights)
        elif perceptual_weight > 0:
            log.warning("no LPIPS weights given (task.lpips_weights): training without the perceptual loss")
        self.ema: AveragedModel | None = None
        if ema_decay:  # averaged, never trained: no gradients (DDP would stop on parameters the loss never used)
            self.ema = AveragedModel(self.autoencoder, multi_avg_fn=ema_multi_avg_fn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        compile_in_place(self.autoencoder, compile)  # after the EMA copy, which stays eager
        # 1 / std of the latents (SD's 0.18215): measured on validation data, saved with the checkpoint; with a
        # frozen encoder, the one stored with the pretrained weights is kept (measured when they store none)
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.keeps_scale = self.keeps_latents and stored_scale is not None
        if self.keeps_scale:
            self.scale_factor.fill_(stored_scale)
        self.optimizer_cfg = {"lr": 4.5e-6, "betas": (0.5, 0.9), "weight_decay": 0.0, **(optimizer or {})}
        self._latent_moments: list[torch.Tensor] = []

    # -- training ---------------------------------------------------------------------------------

    def _nll(self, images: torch.Tensor, reconstructions: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.hparams.reconstruction == "l1":
            rec = (images - reconstructions).abs()
        else:
            rec = (images - reconstructions).pow(2)
        logs = {"rec_loss": rec.mean().detach()}
        if self.lpips is not None:
            perceptual = self.lpips(images.float(), reconstructions.float())  # (B,)
            rec = rec + self.hparams.perceptual_weight * perceptual.view(-1, 1, 1, 1)
            logs["perceptual_loss"] = perceptual.mean().detach()
        nll = rec / torch.exp(self.logvar) + self.logvar
        return nll.sum() / len(images), logs

    def setup(self, stage: str) -> None:
        """Under DDP, whichever way it was chosen (``trainer.strategy=ddp``, a ``DDPStrategy`` config, or
        ``auto`` with several devices, under SLURM or torchrun), turn on unused-parameter detection: the
        generator step leaves the discriminator without gradients (all of it before ``disc_start``) and the
        discriminator step the autoencoder, which plain DDP refuses. Lightning wraps the model after this hook;
        an explicit ``find_unused_parameters`` in the strategy's config is kept."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]  # (B, C, H, W); H != W with data.buckets
        self._check_size(images)
        opt_ae, opt_d = self.optimizers()
        step = self.global_step
        factor = adopt_weight(self.hparams.disc_factor, step, self.hparams.disc_start)

        reconstructions, posterior = self.autoencoder(images)
        nll, logs = self._nll(images, reconstructions)
        kl = posterior.kl().sum() / len(images)
        loss = nll + self.hparams.kl_weight * kl
        if factor > 0:
            self.discriminator.requires_grad_(False)
            g_loss = -self.discriminator(reconstructions).mean()
            self.discriminator.requires_grad_(True)
            weight = adaptive_weight(nll, g_loss, self.autoencoder.last_layer) * self.hparams.disc_weight
            loss = loss + weight * factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=weight)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt_ae)
        opt_ae.step()  # counts the global step
        if self.hparams.scheduler:
            self.lr_schedulers().step()

        if factor > 0:
            logits_real = self.discriminator(images.detach())
            logits_fake = self.discriminator(reconstructions.detach())
            d_loss = factor * hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self._clip(opt_d)
            self.trainer.strategy.optimizer_step(opt_d.optimizer, closure=lambda: None)
            logs.update(d_loss=d_loss.detach(), logits_real=logits_real.mean().detach())
        if self.ema is not None:
            self.ema.update_parameters(self.autoencoder)

        batch_size = len(images)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict(
            {
                "train/kl_loss": kl.detach(),
                "train/nll_loss": nll.detach(),
                "train/logvar": self.logvar.detach(),
                "train/lr": opt_ae.param_groups[0]["lr"],
            },
            batch_size=batch_size,
        )
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)

    def _clip(self, optimizer) -> None:
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        cfg = self.optimizer_cfg
        kwargs = {"lr": cfg["lr"], "betas": tuple(cfg["betas"]), "weight_decay": cfg["weight_decay"]}
        ae_params = [p for p in self.autoencoder.parameters() if p.requires_grad] + [self.logvar]
        optimizers = [
            build_adamw(ae_params, cfg, **kwargs),
            build_adamw(self.discriminator.parameters(), cfg, **kwargs),
        ]
        if not self.hparams.scheduler:
            return optimizers  # constant, as CompVis trains
        # warmup then cosine for the autoencoder's optimizer (stepped by hand in training_step); the discriminator,
        # which starts late, keeps its constant rate
        schedule = dict(self.hparams.scheduler)
        total = schedule.get("total_steps") or self.trainer.max_steps
        if not total or total < 1:
            raise ConfigError("task.scheduler needs task.scheduler.total_steps or trainer.max_steps > 0")
        factor = warmup_cosine(schedule.get("warmup_steps", 0), total, schedule.get("min_lr_ratio", 0.0))
        return optimizers, [torch.optim.lr_scheduler.LambdaLR(optimizers[0], factor)]

    def on_train_end(self) -> None:
        """Export the (EMA) autoencoder in the SD layout: <run folder>/export/autoencoder.safetensors."""
        if self.trainer.is_global_zero:
            from trainer.checkpoints import export_vae

            out = Path(self.trainer.default_root_dir) / "export" / "autoencoder.safetensors"
            export_vae(self.eval_autoencoder, out, self.scale_factor.item(), dict(self.hparams.model))
            log.info("exported the autoencoder (scale factor %.5f) to %s", self.scale_factor.item(), out)

    # -- evaluation -------------------------------------------------------------------------------

    @property
    def eval_autoencoder(self):
        """The EMA weights when EMA is on, else the trained ones."""
        return self.ema.module if self.ema is not None else self.autoencoder

    def check_image_size(self, size: int, key: str) -> None:
        """Before any data is read: image sides must be multiples of the downsampling factor."""
        require_size_multiple(size, self.autoencoder.downsample_factor, key, "the autoencoder's downsampling factor")

    def _check_size(self, images: torch.Tensor) -> None:
        height, width = images.shape[-2:]
        factor = self.autoencoder.downsample_factor
        require_multiple(width, height, factor, "images (data.image_size, or data.buckets' sizes and step)")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        self._check_size(images)
        posterior = self.eval_autoencoder.encode(images)
        reconstructions = self.eval_autoencoder.decode(posterior.mode()).clamp(-1, 1)
        batch_size = len(images)
        metrics = self.quality(images, reconstructions)
        if self.lpips is not None:  # in float32 too, as the other metrics
            with torch.autocast(images.device.type, enabled=False):
                metrics["lpips"] = self.lpips(images.float(), reconstructions.float()).mean()
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=True, batch_size=batch_size)
        seen = sum(len(m) for m in self._latent_moments)
        if seen < self.hparams.scale_factor_samples:
            # one row per image; batches of different buckets have rows of different lengths
            self._latent_moments.append(list(posterior.sample().flatten(1).float()))
        if batch_idx == 0:
            self._log_grid(images[: self.hparams.log_images], reconstructions[: self.hparams.log_images])

    @staticmethod
    def quality(images: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, torch.Tensor]:
        """PSNR, SSIM and mean absolute error of reconstructions of images in [-1, 1], computed in float32 with
        autocast off: under bf16 mixed precision SSIM's local variances (E[x^2] - E[x]^2) cancel to noise
        (0.44 where float32 reads 0.98)."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        images, reconstructions = images.float(), reconstructions.float()
        with torch.autocast(images.device.type, enabled=False):
            return {
                "psnr": psnr(images, reconstructions).mean(),
                "ssim": structural_similarity_index_measure(
                    (reconstructions + 1) / 2, (images + 1) / 2, data_range=1.0
                ),
                "rec_loss": (images - reconstructions).abs().mean(),
            }

    def on_validation_epoch_end(self) -> None:
        if not self._latent_moments:
            return
        latents = torch.cat([row for rows in self._latent_moments for row in rows])  # every latent value, flat
        self._latent_moments = []
        if self.keeps_scale:  # the encoder is frozen: the latents' scale is the pretrained one
            self.log("val/scale_factor", self.scale_factor, sync_dist=False)
            return
        # std over all latent values of all ranks
        count = torch.tensor(float(latents.numel()), device=self.device)
        total, squares = latents.sum(), latents.pow(2).sum()
        if self.trainer.world_size > 1:
            count, total, squares = (self.all_gather(t).sum() for t in (count, total, squares))
        std = (squares / count - (total / count) ** 2).clamp(min=1e-12).sqrt()
        self.scale_factor.fill_(1.0 / std.item())
        self.log("val/scale_factor", self.scale_factor, sync_dist=False)

    def _log_grid(self, images: torch.Tensor, reconstructions: torch.Tensor) -> None:
        from torchvision.utils import make_grid

        grid = make_grid(torch.cat([images, reconstructions]).float().add(1).div(2).clamp(0, 1), nrow=len(images))
        if self.trainer.is_global_zero:  # also as a PNG in the run folder, for CSV-only runs
            from torchvision.utils import save_image

            folder = Path(self.trainer.default_root_dir) / "images"
            folder.mkdir(parents=True, exist_ok=True)
            save_image(grid, folder / f"reconstructions_{self.global_step:08d}.png")
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("val/reconstructions", grid, self.global_step)
            elif hasattr(logger, "log_image"):  # wandb
                logger.log_image("val/reconstructions", [grid], step=self.global_step)
