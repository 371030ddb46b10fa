"""The KL autoencoder of latent diffusion and Stable Diffusion, as a pure torch module.

Parameter names and shapes follow CompVis' ``ldm.modules.diffusionmodules.model`` (``Encoder``,
``Decoder``) and ``ldm.models.autoencoder.AutoencoderKL``, so the ``first_stage_model.`` weights of a
released Stable Diffusion checkpoint (with that prefix removed) load with ``strict=True`` into
``AutoencoderKL.from_config(SD_KL_F8)``.

The encoder maps an image (B, in_channels, H, W) to the moments (mean, log-variance) of a diagonal
Gaussian over latents (B, embed_dim, H / f, W / f), with f = 2 ** (len(ch_mult) - 1); the decoder maps
latents back to images. Configs are plain dicts in the released layout: ``{"embed_dim": ..., "ddconfig": {...}}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.errors import ConfigError

# The Stable Diffusion 1.x / 2.x VAE (``first_stage_config.params`` without its lossconfig).
SD_KL_F8: dict[str, Any] = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}

# latent-diffusion's kl-f4 first stage (``models/first_stage_models/kl-f4``): 3 latent channels at H / 4.
KL_F4: dict[str, Any] = {
    "embed_dim": 3,
    "ddconfig": {
        "double_z": True,
        "z_channels": 3,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}

# A small f8 model with SD's latent layout (4 channels at H / 8) for CPU tests and demos.
TINY: dict[str, Any] = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2, 2, 4],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}

DDCONFIG_KEYS = frozenset(SD_KL_F8["ddconfig"])
# Attention variants of the original that compute the same thing as ours (xformers is only a kernel).
# "none": no attention in the mid blocks (CompVis make_attn's Identity): fully convolutional, so a model trained
# on crops encodes and decodes larger images the same way (global attention would see more tokens than in training)
SUPPORTED_ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")
# ddconfig keys beyond the released ones, with their SD values. norm_num_groups (diffusers' name): GroupNorm's groups.
# SD has 32 groups over >= 128 channels (4 or more a group); a tiny model with 32 channels would get one channel a
# group, i.e. InstanceNorm, which removes each channel's mean: a flat image's color then reaches the latents only
# through the zero padding at the borders. 0: no normalization layers at all (identity): a tiny model on flat-color
# images (the shapes demo) learns several times faster per step without them (docs/benchmarks.md, "The shapes demo").
EXTRA_DDCONFIG = {"attn_type": "vanilla", "norm_num_groups": 32}
# Keys of a released ``first_stage_config.params`` that configure training or loading, not the network.
IGNORED_PARAMS = frozenset({"lossconfig", "monitor", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels"})


def group_norm(channels: int, groups: int = 32) -> nn.Module:
    """The normalisation used throughout: 32 groups (SD), eps 1e-6, affine; none (identity) with 0 groups."""
    if groups == 0:
        return nn.Identity()
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice (dropout before the second conv), plus a residual that a
    1x1 ``nin_shortcut`` projects when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H * W positions, with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head, positions as the sequence.
        q, k, v = (rearrange(proj(h), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a stride-2 conv3x3 without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ``block`` (ResNet blocks), ``attn`` (one attention
    after each block, or none) and, except at the last level, a ``downsample`` or ``upsample``."""

    def __init__(self, block: list[ResnetBlock], attn: list[AttnBlock], resample: nn.Module | None, name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(block)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            self.add_module(name, resample)


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, attention: bool = True, groups: int = 32) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)


class _CheckpointedStack(nn.Module):
    """Runs ResNet and attention blocks, checkpointed while training when ``gradient_checkpointing`` is on."""

    gradient_checkpointing: bool

    def run(self, module: nn.Module, h: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, h, use_reentrant=False)
        return module(h)

    def run_mid(self, mid: MidBlock, h: Tensor) -> Tensor:
        for module in (mid.block_1, mid.attn_1, mid.block_2):
            h = self.run(module, h)
        return h


class Encoder(_CheckpointedStack):
    """Image (B, in_channels, H, W) -> moments (B, 2 * z_channels, H / f, W / f) (or z_channels
    without ``double_z``). ``resolution`` is the nominal input size that ``attn_resolutions`` refer to."""

    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        double_z: bool,
        resolution: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        mid_attention: bool = True,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        current_resolution = resolution
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_groups))
            is_last = level == len(ch_mult) - 1
            self.down.append(Level(blocks, attns, None if is_last else Downsample(block_in), "downsample"))
            if not is_last:
                current_resolution //= 2
        self.mid = MidBlock(block_in, dropout, mid_attention, norm_groups)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = self.run(block, h)
                if len(level.attn) > 0:
                    h = self.run(level.attn[i], h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_CheckpointedStack):
    """Latents (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f).

    ``up`` is indexed by resolution level as in the original: ``up[0]`` works at full resolution and
    runs last; ``up[len(ch_mult) - 1]`` runs first. Each level has ``num_res_blocks + 1`` ResNet blocks.
    """

    def __init__(
        self,
        *,
        out_ch: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        resolution: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
        mid_attention: bool = True,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in, dropout, mid_attention, norm_groups)
        levels: list[Level] = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_groups))
            levels.insert(0, Level(blocks, attns, Upsample(block_in) if level != 0 else None, "upsample"))
            if level != 0:
                current_resolution *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        # The upsampling path runs in NHWC whatever the weights' layout: oneDNN convolutions are faster on NHWC on CPU and
        # nearest upsampling of an NCHW tensor converts to NHWC and back inside the kernel (see docs/benchmarks.md).
        h = self.run_mid(self.mid, self.conv_in(z)).contiguous(memory_format=torch.channels_last)
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = self.run(block, h)
                if len(level.attn) > 0:
                    h = self.run(level.attn[i], h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """A Gaussian with diagonal covariance over (B, C, H, W) latents, built from moments
    (B, 2C, H, W) = mean and log-variance concatenated along channels. The log-variance is clamped
    to [-30, 20] as in the original."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw: mean + std * noise (differentiable in mean and std)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) per sample, summed over C, H, W: shape (B,). ``other`` defaults to N(0, I)."""
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=(1, 2, 3))
        return 0.5 * torch.sum(
            (self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=(1, 2, 3),
        )

    def nll(self, x: Tensor) -> Tensor:
        """Negative log-likelihood of ``x`` per sample, summed over C, H, W: shape (B,)."""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (x - self.mean) ** 2 / self.var, dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder + ``quant_conv`` -> DiagonalGaussian posterior; latents -> ``post_quant_conv`` + Decoder.

    ``AutoencoderKL(embed_dim=4, ddconfig={...})`` takes a released ``first_stage_config.params``'s
    two network entries; ``lossconfig`` is accepted and ignored (losses live in the training task).
    :meth:`from_config` takes the whole params dict, training-only keys (monitor, ckpt_path, ...) included.
    """

    def __init__(
        self,
        embed_dim: int,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any] | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        ddconfig = dict(ddconfig)
        unknown = set(ddconfig) - DDCONFIG_KEYS - set(EXTRA_DDCONFIG)
        missing = DDCONFIG_KEYS - set(ddconfig)
        if unknown or missing:
            raise ConfigError(
                f"ddconfig has unknown keys {sorted(unknown)} and lacks {sorted(missing)}; expected {sorted(DDCONFIG_KEYS)}"
            )
        attn_type = ddconfig.pop("attn_type", "vanilla")
        if attn_type not in SUPPORTED_ATTN_TYPES:
            raise ConfigError(f"ddconfig.attn_type {attn_type!r} is not supported; use one of {SUPPORTED_ATTN_TYPES}")
        if not ddconfig["double_z"]:
            raise ConfigError("AutoencoderKL needs ddconfig.double_z=True: the encoder predicts mean and log-variance")
        norm_groups = ddconfig.pop("norm_num_groups", EXTRA_DDCONFIG["norm_num_groups"])
        widths = [ddconfig["ch"] * mult for mult in ddconfig["ch_mult"]]
        if (
            not isinstance(norm_groups, int)
            or norm_groups < 0
            or (norm_groups and any(w % norm_groups for w in widths))
        ):
            raise ConfigError(
                f"ddconfig.norm_num_groups {norm_groups!r} must divide every level's width {widths} (0: no normalization)"
            )
        self.embed_dim = embed_dim
        # the keys beyond SD's are kept only when they differ from SD, so SD-like configs stay SD configs
        extra = {"attn_type": attn_type, "norm_num_groups": norm_groups}
        self.ddconfig = {**ddconfig, **{k: v for k, v in extra.items() if v != EXTRA_DDCONFIG[k]}}
        shared = {key: ddconfig[key] for key in ("ch", "ch_mult", "num_res_blocks", "z_channels", "resolution")}
        shared.update(attn_resolutions=ddconfig["attn_resolutions"], dropout=ddconfig["dropout"])
        shared.update(mid_attention=attn_type != "none", norm_groups=norm_groups)
        self.encoder = Encoder(in_channels=ddconfig["in_channels"], double_z=True, **shared)
        self.decoder = Decoder(out_ch=ddconfig["out_ch"], **shared)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        self.gradient_checkpointing = gradient_checkpointing
        self.channels_last = False

    @classmethod
    def from_config(cls, params: Mapping[str, Any], gradient_checkpointing: bool = False) -> AutoencoderKL:
        """Build from a released ``first_stage_config.params`` dict (or one of this module's configs)."""
        unknown = set(params) - {"embed_dim", "ddconfig"} - IGNORED_PARAMS
        if unknown:
            raise ConfigError(f"autoencoder params have unknown keys {sorted(unknown)}")
        return cls(params["embed_dim"], params["ddconfig"], gradient_checkpointing=gradient_checkpointing)

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether ResNet and attention blocks are recomputed in the backward pass (training mode only)."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def to_channels_last(self) -> AutoencoderKL:
        """Store the conv weights in channels_last (NHWC) memory format and run on NHWC activations: the fast layout
        for convolutions and nearest upsampling with oneDNN on CPU and for bf16/fp16 convs on CUDA. :meth:`encode` and
        :meth:`decode` then convert their inputs, so callers pass tensors in either layout; outputs come in NHWC.
        Returns the model. State dicts are unaffected (checkpoint writers store contiguous copies)."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side."""
        return 2 ** (len(self.ddconfig["ch_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents that :meth:`decode` takes (``embed_dim``)."""
        return self.embed_dim

    @property
    def out_channels(self) -> int:
        """Channels of the images that :meth:`decode` returns (``ddconfig.out_ch``)."""
        return self.ddconfig["out_ch"]

    @property
    def last_layer(self) -> Tensor:
        """The decoder's final conv weight, where the GAN loss's adaptive weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images (B, in_channels, H, W), H and W multiples of the downsample factor -> posterior over
        latents (B, embed_dim, H / f, W / f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(self._layout(x))))

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, out_ch, h * f, w * f)."""
        return self.decoder(self.post_quant_conv(self._layout(z)))

    def forward(self, x: Tensor, sample_posterior: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction of ``x`` from a posterior sample (or its mean), and the posterior."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
