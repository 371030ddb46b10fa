"""The text-conditioned UNet of latent diffusion and Stable Diffusion, as a pure torch module.

Parameter names and shapes follow CompVis' / Stability's ``ldm.modules.diffusionmodules.openaimodel.UNetModel``
with the ``SpatialTransformer`` of ``ldm.modules.attention``, so the ``model.diffusion_model.`` weights of a released
Stable Diffusion 1.x / 2.x checkpoint (with that prefix removed) load with ``strict=True`` into
``UNetModel.from_config(SD15)`` / ``UNetModel.from_config(SD2)``.

The network maps noisy latents (B, in_channels, H, W), timesteps (B,) and a context of per-token text embeddings
(B, L, context_dim) to (B, out_channels, H, W) (noise, or v, as the training objective chooses). H and W may differ
and must be multiples of 2 ** (len(channel_mult) - 1); L is free.

Layout (``ds`` is the downsampling factor of a level, the unit of ``attention_resolutions``):

- ``time_embed``: Linear, SiLU, Linear (model_channels -> 4 * model_channels) over :func:`timestep_embedding`.
- ``input_blocks``: ``0`` is the input conv; then per level ``num_res_blocks`` entries of ResBlock [+
  SpatialTransformer where ``ds`` is in ``attention_resolutions``], and a Downsample entry except at the last level.
- ``middle_block``: ResBlock, SpatialTransformer, ResBlock.
- ``output_blocks``: per level from the deepest, ``num_res_blocks + 1`` entries of ResBlock (over the hidden state
  concatenated with the matching ``input_blocks`` output) [+ SpatialTransformer] [+ Upsample after the last entry of
  every level but the first].
- ``out``: GroupNorm, SiLU, conv.

As in the original, the last conv of every ResBlock, the ``proj_out`` of every SpatialTransformer and ``out.2`` are
zero-initialised, so a freshly built model outputs exactly zero.

Differences from the original, none of which changes the weights or the maths: attention always goes through
``F.scaled_dot_product_attention``; gradient checkpointing is one switch (``gradient_checkpointing``, set from the
config's ``use_checkpoint``) that recomputes every ResBlock and SpatialTransformer in the backward pass while training;
precision comes from autocast (``use_fp16`` is ignored). Only the text-conditioned variant is built: every attention
layer is a SpatialTransformer, there are no class labels, and convolutions are 2-D.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.errors import ConfigError

# Stable Diffusion 1.x (``v1-inference.yaml``'s ``unet_config.params``): 8 heads everywhere, conv projections,
# CLIP ViT-L/14 text embeddings (768).
SD15: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": True,
    "legacy": False,
}

# Stable Diffusion 2.x (``v2-inference.yaml``): 64 channels per head (5, 10, 20 heads), linear projections in the
# transformers, OpenCLIP ViT-H/14 text embeddings (1024).
SD2: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 1024,
    "use_checkpoint": True,
    "legacy": False,
}

# A small SD 2.x-style model for CPU tests and demos: 4 latent channels, two levels, cross-attention at the lower one.
TINY: dict[str, Any] = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 64,
    "use_checkpoint": False,
    "legacy": False,
}

# Keys of a released ``unet_config.params`` that do not change this network: precision (autocast decides) and the
# options of the original's AttentionBlock, which a UNet built only of SpatialTransformers does not use.
IGNORED_PARAMS = frozenset({"use_bf16", "num_heads_upsample", "use_new_attention_order"})
# Options of the original that this module builds only at their default value (anything else is a ConfigError).
DEFAULT_ONLY_PARAMS: dict[str, Any] = {
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "n_embed": None,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
}


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps (B,) -> (B, dim) in float32, as in the original: ``[cos(t * f), sin(t * f)]``
    with frequencies ``f_i = max_period ** (-i / half)`` for ``i < half = dim // 2``, zero-padded when ``dim`` is odd."""
    half = dim // 2
    exponents = torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(-math.log(max_period) * exponents / half)
    angles = timesteps[:, None].float() * frequencies[None]  # (B, half)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Set all parameters of ``module`` to zero and return it."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class GroupNorm32(nn.GroupNorm):
    """32 groups (SD; ``groups`` otherwise, eps 1e-5), computed in float32 and cast back to the input dtype: the
    normalisation of the ResBlocks and of ``out``, whatever dtype the parameters are kept in."""

    def __init__(self, channels: int, groups: int = 32) -> None:
        if channels % groups:
            raise ConfigError(f"norm_num_groups={groups} does not divide the {channels} channels of a GroupNorm")
        super().__init__(num_groups=groups, num_channels=channels)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, plus the projected timestep embedding added per channel, then GroupNorm -> SiLU ->
    dropout -> conv3x3 (zero-initialised), plus a residual that a 1x1 ``skip_connection`` projects when the channel
    count changes."""

    conditioning = "embedding"  # what TimestepEmbedSequential passes it beside the features

    def __init__(self, channels: int, embed_channels: int, out_channels: int, dropout: float, groups: int = 32) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(embed_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(embedding).to(h.dtype)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of a sequence (B, N, query_dim) to ``context`` (B, L, context_dim), or to itself when no
    context is given. Projections without bias, output projection ``to_out.0`` with bias."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_channels: int) -> None:
        super().__init__()
        inner_dim = heads * head_channels
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # A Sequential so that the output projection is ``to_out.0`` as in the released layout.
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = (rearrange(proj(source), "b l (h d) -> b h l d", h=self.heads) for proj in (self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v: (B, heads, N, d)
        return self.to_out(rearrange(h, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """``proj`` to twice the width, then the first half gated by GELU of the second half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4 * dim, then a Linear back to dim."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        inner_dim = dim * mult
        # ``net.1`` stands where the original has a Dropout(0.0), so that the output Linear is ``net.2``.
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the context and GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, head_channels: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_channels)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_channels)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H * W positions of a feature map, conditioned on the context: GroupNorm (eps 1e-6),
    ``proj_in``, ``transformer_blocks``, ``proj_out`` (zero-initialised), plus a residual. The projections are 1x1
    convs on the map (SD 1.x) or, with ``use_linear``, Linears on the sequence (SD 2.x); both compute the same."""

    conditioning = "context"  # what TimestepEmbedSequential passes it beside the features

    def __init__(
        self,
        channels: int,
        heads: int,
        head_channels: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        groups: int = 32,
    ) -> None:
        super().__init__()
        self.use_linear = use_linear
        if channels % groups:
            raise ConfigError(f"norm_num_groups={groups} does not divide the {channels} channels of a GroupNorm")
        self.norm = nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, channels)
            self.proj_out: nn.Module = zero_module(nn.Linear(channels, channels))
        else:
            self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
            self.proj_out = zero_module(nn.Conv2d(channels, channels, kernel_size=1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, head_channels, context_dim) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")  # positions as the sequence
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = rearrange(h, "b (h w) c -> b c h w", h=height, w=width)
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    """Halve H and W: a stride-2 conv3x3 (padding 1) ``op``, or a 2x2 average pool without ``conv_resample``."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a conv3x3 ``conv`` (none without ``conv_resample``)."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    """One entry of ``input_blocks``, ``output_blocks`` or the ``middle_block``: its layers in order, ResBlocks given
    the timestep embedding and SpatialTransformers the context, each recomputed in the backward pass when
    ``checkpointing``. A layer says what it takes by its ``conditioning`` attribute, not by its class: wrappers
    (FSDP units, activation checkpointing) hide the class but pass attribute lookups through to the layer."""

    def forward(self, h: Tensor, embedding: Tensor, context: Tensor, checkpointing: bool = False) -> Tensor:
        for layer in self:
            kind = getattr(layer, "conditioning", None)
            if kind is None:
                h = layer(h)
                continue
            if kind not in ("embedding", "context"):
                raise ValueError(f"{type(layer).__name__}.conditioning must be 'embedding' or 'context', got {kind!r}")
            condition = embedding if kind == "embedding" else context
            h = checkpoint(layer, h, condition, use_reentrant=False) if checkpointing else layer(h, condition)
        return h


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
    """(heads, channels per head) of the attention at ``channels``: ``num_head_channels`` per head when it is set
    (it takes precedence, as in the original), else ``num_heads`` heads."""
    if num_head_channels != -1:
        if channels % num_head_channels:
            raise ConfigError(
                f"num_head_channels={num_head_channels} does not divide the {channels} channels of a level"
            )
        return channels // num_head_channels, num_head_channels
    if channels % num_heads:
        raise ConfigError(f"num_heads={num_heads} does not divide the {channels} channels of a level")
    return num_heads, channels // num_heads


class UNetModel(nn.Module):
    """The conditioned UNet: ``forward(latents, timesteps, context)``; see the module docstring for the layout.

    Arguments are those of a released ``unet_config.params``. ``attention_resolutions`` lists downsampling factors
    (1 = the latent resolution) where SpatialTransformers go; ``num_res_blocks`` is one count for all levels or one per
    level; heads are ``num_head_channels`` wide when that is set, else there are ``num_heads`` of them.
    ``use_checkpoint`` sets :attr:`gradient_checkpointing`. Accepted and without effect: ``image_size`` (the network
    takes any multiple of :attr:`downsample_factor`), ``use_fp16`` (use autocast), ``legacy`` (it only changes head
    counts of the AttentionBlock, which is not built here). ``use_spatial_transformer`` defaults to True here (the
    original's default False means its AttentionBlock UNet); False, ``num_classes`` and ``dims`` other than 2 raise
    ConfigError. ``norm_num_groups`` (default 32, as released UNets) sets the groups of every GroupNorm: a small UNet
    of 32-64 channels has one or two channels per group at 32, each normalized on its own.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        attention_resolutions: Sequence[int],
        num_res_blocks: int | Sequence[int],
        context_dim: int,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        num_heads: int = -1,
        num_head_channels: int = -1,
        transformer_depth: int = 1,
        use_linear_in_transformer: bool = False,
        use_spatial_transformer: bool = True,
        dropout: float = 0.0,
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        image_size: int | None = None,
        use_fp16: bool = False,
        legacy: bool = True,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        del image_size, use_fp16, legacy  # accepted for compatibility with released configs; see the docstring
        if not use_spatial_transformer:
            raise ConfigError(
                "use_spatial_transformer=False (the original's self-attention-only AttentionBlock UNet) is not "
                "supported: this UNet is text-conditioned; set use_spatial_transformer=True and context_dim"
            )
        if num_classes is not None:
            raise ConfigError(f"num_classes={num_classes!r}: class-conditional UNets are not supported; use None")
        if dims != 2:
            raise ConfigError(f"dims={dims}: only 2-D UNets are supported")
        if num_heads == -1 and num_head_channels == -1:
            raise ConfigError("set num_heads or num_head_channels (both are -1)")
        channel_mult = [int(mult) for mult in channel_mult]
        if isinstance(num_res_blocks, int):
            res_blocks = [num_res_blocks] * len(channel_mult)
        else:
            res_blocks = [int(count) for count in num_res_blocks]
            if len(res_blocks) != len(channel_mult):
                raise ConfigError(
                    f"num_res_blocks={res_blocks} needs one count per level of channel_mult={channel_mult}"
                )
        attention_factors = {int(factor) for factor in attention_resolutions}

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.channel_mult = tuple(channel_mult)
        self.gradient_checkpointing = use_checkpoint
        groups = int(norm_num_groups)
        if groups < 1:
            raise ConfigError(f"norm_num_groups must be >= 1, got {norm_num_groups}")
        self.norm_num_groups = groups  # no tensor shape shows it: exports record it in their metadata

        def transformer(channels: int) -> SpatialTransformer:
            heads, head_channels = attention_heads(channels, num_heads, num_head_channels)
            return SpatialTransformer(
                channels, heads, head_channels, transformer_depth, context_dim, use_linear_in_transformer, groups
            )

        embed_channels = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, embed_channels), nn.SiLU(), nn.Linear(embed_channels, embed_channels)
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, kernel_size=3, padding=1))]
        )
        skip_channels = [model_channels]  # channels of each input block's output, consumed by the output blocks
        channels, factor = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(channels, embed_channels, model_channels * mult, dropout, groups)]
                channels = model_channels * mult
                if factor in attention_factors:
                    layers.append(transformer(channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels, conv_resample)))
                skip_channels.append(channels)
                factor *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(channels, embed_channels, channels, dropout, groups),
            transformer(channels),
            ResBlock(channels, embed_channels, channels, dropout, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(res_blocks[level] + 1):
                layers = [
                    ResBlock(channels + skip_channels.pop(), embed_channels, model_channels * mult, dropout, groups)
                ]
                channels = model_channels * mult
                if factor in attention_factors:
                    layers.append(transformer(channels))
                if level != 0 and index == res_blocks[level]:
                    layers.append(Upsample(channels, conv_resample))
                    factor //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(channels, groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)),
        )

    @classmethod
    def from_config(cls, params: Mapping[str, Any]) -> UNetModel:
        """Build from a released ``unet_config.params`` dict (or one of this module's configs), as is.

        ``use_checkpoint`` turns gradient checkpointing on. Ignored: ``image_size``, ``use_fp16``, ``legacy`` (see the
        class docstring) and :data:`IGNORED_PARAMS`. The options in :data:`DEFAULT_ONLY_PARAMS` must keep their
        default value; those and unknown or missing keys raise ConfigError.
        """
        signature = inspect.signature(cls)
        accepted = set(signature.parameters)
        unknown = set(params) - accepted - IGNORED_PARAMS - set(DEFAULT_ONLY_PARAMS)
        if unknown:
            raise ConfigError(f"unet params have unknown keys {sorted(unknown)}")
        required = {name for name, parameter in signature.parameters.items() if parameter.default is parameter.empty}
        missing = required - set(params)
        if missing:
            raise ConfigError(f"unet params lack required keys {sorted(missing)}")
        for key, default in DEFAULT_ONLY_PARAMS.items():
            if key in params and params[key] != default:
                raise ConfigError(f"unet params {key}={params[key]!r} is not supported; only {default!r} is")
        return cls(**{key: value for key, value in params.items() if key in accepted})

    @property
    def downsample_factor(self) -> int:
        """Latent height and width must be multiples of this: 2 ** (number of levels - 1)."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_channels_last(self) -> UNetModel:
        """Store the conv weights in channels_last (NHWC) memory format, the fast layout for convs on GPUs; returns
        the model. Inputs may be in either format; outputs come in channels_last."""
        return self.to(memory_format=torch.channels_last)

    def forward(self, latents: Tensor, timesteps: Tensor | float, context: Tensor | None) -> Tensor:
        """Latents (B, in_channels, H, W), timesteps (B,) (or one for the whole batch) and context (B, L, context_dim)
        -> (B, out_channels, H, W). H and W must be multiples of :attr:`downsample_factor`."""
        batch, _, height, width = latents.shape
        if height % self.downsample_factor or width % self.downsample_factor:
            raise ValueError(
                f"latent height and width must be multiples of {self.downsample_factor} for this UNet's "
                f"{len(self.channel_mult)} levels; got {height}x{width}"
            )
        if context is None:
            raise ValueError(
                f"UNetModel needs a context (B, L, {self.context_dim}) for its cross-attention; got None "
                "(for unconditional samples pass the embedding of the empty prompt)"
            )
        if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must be ({batch}, L, {self.context_dim}); got {tuple(context.shape)}")
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be ({batch},) or a scalar; got {tuple(timesteps.shape)}")

        time_embed_dtype = self.time_embed[0].weight.dtype
        embedding = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(time_embed_dtype))
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        h = latents
        skips = []
        for block in self.input_blocks:
            h = block(h, embedding, context, checkpointing)
            skips.append(h)
        h = self.middle_block(h, embedding, context, checkpointing)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H', W')
            h = block(h, embedding, context, checkpointing)
        return self.out(h)
