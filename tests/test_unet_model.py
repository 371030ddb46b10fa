"""The conditioned UNet: released SD 1.x / 2.x layouts, attention and timestep maths, shapes, checkpointing, formats."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer.errors import ConfigError
from trainer.models import unet
from trainer.models.unet import (
    SD2,
    SD15,
    TINY,
    CrossAttention,
    ResBlock,
    SpatialTransformer,
    UNetModel,
    timestep_embedding,
)

# Parameters and tensors of the released UNets (``model.diffusion_model.*`` of an SD checkpoint).
SD15_PARAMETERS = 859_520_964
SD2_PARAMETERS = 865_910_724
SD_TENSORS = 686

# A sample of the SD 1.5 checkpoint's ``model.diffusion_model.*`` keys (prefix removed) and their shapes.
SD15_KEYS = {
    "time_embed.0.weight": (1280, 320),
    "time_embed.0.bias": (1280,),
    "time_embed.2.weight": (1280, 1280),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.0.0.bias": (320,),
    "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.0.bias": (320,),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "input_blocks.1.1.norm.weight": (320,),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.1.1.transformer_blocks.0.norm3.bias": (320,),
    "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.in_layers.2.weight": (640, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.5.1.transformer_blocks.0.attn2.to_q.weight": (640, 640),
    "input_blocks.6.0.op.weight": (640, 640, 3, 3),
    "input_blocks.7.0.skip_connection.weight": (1280, 640, 1, 1),
    "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
    "input_blocks.9.0.op.bias": (1280,),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "middle_block.0.emb_layers.1.weight": (1280, 1280),
    "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "middle_block.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
    "middle_block.2.in_layers.2.weight": (1280, 1280, 3, 3),
    "output_blocks.0.0.in_layers.0.weight": (2560,),
    "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.3.1.proj_in.weight": (1280, 1280, 1, 1),
    "output_blocks.5.0.in_layers.2.weight": (1280, 1920, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.6.0.skip_connection.weight": (640, 1920, 1, 1),
    "output_blocks.8.0.in_layers.0.weight": (960,),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.9.0.skip_connection.weight": (320, 960, 1, 1),
    "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "output_blocks.11.1.proj_out.bias": (320,),
    "out.0.weight": (320,),
    "out.2.weight": (4, 320, 3, 3),
    "out.2.bias": (4,),
}

# Keys the released layout does not have: identity skips, no transformer at factor 8, no resampling at the ends.
SD15_ABSENT = [
    "input_blocks.1.0.skip_connection.weight",
    "input_blocks.10.1.norm.weight",
    "input_blocks.12.0.in_layers.0.weight",
    "middle_block.0.skip_connection.weight",
    "output_blocks.0.1.norm.weight",
    "output_blocks.2.2.conv.weight",
    "output_blocks.11.2.conv.weight",
    "output_blocks.12.0.in_layers.0.weight",
]

# SD 2.x differs only in these shapes: Linear projections in the transformers and a 1024-wide context.
SD2_KEYS = {
    "input_blocks.1.1.proj_in.weight": (320, 320),
    "input_blocks.1.1.proj_out.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
    "input_blocks.4.1.proj_in.weight": (640, 640),
    "middle_block.1.proj_out.weight": (1280, 1280),
    "middle_block.1.transformer_blocks.0.attn2.to_v.weight": (1280, 1024),
    "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
}

# An SD 1.x-style tiny variant: fixed head count, conv projections, attention at both levels, deeper transformers.
TINY_CONV = TINY | {
    "num_heads": 2,
    "num_head_channels": -1,
    "use_linear_in_transformer": False,
    "attention_resolutions": [1, 2],
    "num_res_blocks": [1, 2],
    "transformer_depth": 2,
}
# Three levels (latent sides multiples of 4), pooling and interpolation without resampling convs.
TINY_THREE_LEVELS = TINY | {"channel_mult": [1, 2, 2], "attention_resolutions": [4], "conv_resample": False}


def build_meta(config: dict) -> UNetModel:
    with torch.device("meta"):
        return UNetModel.from_config(config)


@pytest.fixture(scope="module")
def sd15_meta() -> UNetModel:
    return build_meta(SD15)


@pytest.fixture(scope="module")
def sd2_meta() -> UNetModel:
    return build_meta(SD2)


def randomized(model: UNetModel, seed: int = 0) -> UNetModel:
    """``model`` with noise added to every parameter, so that zero-initialised layers contribute too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def inputs(config: dict, batch: int = 2, size: tuple[int, int] = (8, 8), length: int = 7, seed: int = 0):
    """Latents, timesteps and context for ``config``."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, config["in_channels"], *size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, length, config["context_dim"], generator=generator)
    return latents, timesteps, context


def test_sd15_parameter_count(sd15_meta: UNetModel) -> None:
    assert sum(p.numel() for p in sd15_meta.parameters()) == SD15_PARAMETERS
    assert len(sd15_meta.state_dict()) == SD_TENSORS
    assert sd15_meta.gradient_checkpointing and sd15_meta.downsample_factor == 8


def test_sd15_key_names_and_shapes(sd15_meta: UNetModel) -> None:
    state = sd15_meta.state_dict()
    shapes = {key: tuple(state[key].shape) for key in SD15_KEYS if key in state}
    assert shapes == SD15_KEYS
    assert not [key for key in SD15_ABSENT if key in state]
    assert len(sd15_meta.input_blocks) == 12 and len(sd15_meta.output_blocks) == 12
    heads = {module.heads for module in sd15_meta.modules() if isinstance(module, CrossAttention)}
    assert heads == {8}


def test_sd2_parameter_count_and_layout(sd15_meta: UNetModel, sd2_meta: UNetModel) -> None:
    assert sum(p.numel() for p in sd2_meta.parameters()) == SD2_PARAMETERS
    sd15_state, sd2_state = sd15_meta.state_dict(), sd2_meta.state_dict()
    assert list(sd2_state) == list(sd15_state)
    assert {key: tuple(sd2_state[key].shape) for key in SD2_KEYS} == SD2_KEYS
    changed = {key for key in sd2_state if sd2_state[key].shape != sd15_state[key].shape}
    assert {key.rsplit(".", 2)[-2] for key in changed} == {"proj_in", "proj_out", "to_k", "to_v"}
    # 64 channels per head: 5, 10 and 20 heads at 320, 640 and 1280 channels.
    assert sd2_meta.input_blocks[1][1].transformer_blocks[0].attn1.heads == 5
    assert sd2_meta.input_blocks[4][1].transformer_blocks[0].attn2.heads == 10
    assert sd2_meta.middle_block[1].transformer_blocks[0].attn1.heads == 20


@pytest.mark.parametrize(
    ("config", "size", "length"),
    [
        (TINY, (8, 8), 7),
        (TINY, (6, 12), 7),
        (TINY, (10, 4), 1),
        (TINY_CONV, (8, 8), 7),
        (TINY_CONV, (4, 14), 77),
        (TINY_THREE_LEVELS, (8, 8), 7),
        (TINY_THREE_LEVELS, (12, 4), 7),
    ],
)
def test_forward_shapes(config: dict, size: tuple[int, int], length: int) -> None:
    model = randomized(UNetModel.from_config(config)).eval()
    latents, timesteps, context = inputs(config, size=size, length=length)
    with torch.no_grad():
        output = model(latents, timesteps, context)
    assert output.shape == (2, config["out_channels"], *size)
    assert torch.isfinite(output).all()


def test_output_depends_on_timesteps_and_context() -> None:
    model = randomized(UNetModel.from_config(TINY)).eval()
    latents, timesteps, context = inputs(TINY, size=(8, 12))
    with torch.no_grad():
        output = model(latents, timesteps, context)
        assert not torch.allclose(model(latents, timesteps + 1, context), output)
        assert not torch.allclose(model(latents, timesteps, context.flip(1)), output)
        same_step = model(latents, torch.full((2,), 250), context)
        torch.testing.assert_close(model(latents, 250, context), same_step)


def test_fresh_model_outputs_exact_zeros() -> None:
    model = UNetModel.from_config(TINY_CONV).eval()
    zeroed = [model.out[2]]
    for module in model.modules():
        if isinstance(module, ResBlock):
            zeroed.append(module.out_layers[3])
            assert module.in_layers[2].weight.abs().sum() > 0
        elif isinstance(module, SpatialTransformer):
            zeroed.append(module.proj_out)
            assert module.proj_in.weight.abs().sum() > 0
    assert len(zeroed) == 1 + 10 + 9
    assert all(parameter.eq(0).all() for layer in zeroed for parameter in layer.parameters())
    with torch.no_grad():
        output = model(*inputs(TINY_CONV, size=(8, 6)))
    assert torch.equal(output, torch.zeros_like(output))


def naive_attention(attention: CrossAttention, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out with plain reshapes."""
    heads = attention.heads
    head_channels = attention.to_q.out_features // heads

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, heads * d) -> (B, heads, N, d)
        return t.reshape(t.shape[0], t.shape[1], heads, head_channels).permute(0, 2, 1, 3)

    q, k, v = split(attention.to_q(x)), split(attention.to_k(source)), split(attention.to_v(source))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_channels), dim=-1)  # (B, heads, N, L)
    return attention.to_out((weights @ v).permute(0, 2, 1, 3).flatten(2))


def test_sdpa_cross_attention_equals_naive_softmax() -> None:
    torch.manual_seed(0)
    cross = CrossAttention(query_dim=32, context_dim=48, heads=4, head_channels=8).eval()
    own = CrossAttention(query_dim=32, context_dim=32, heads=2, head_channels=16).eval()
    x, context = torch.randn(2, 10, 32), torch.randn(2, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(cross(x, context), naive_attention(cross, x, context), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(own(x), naive_attention(own, x, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim", [8, 9, 320])
def test_timestep_embedding_matches_formula(dim: int) -> None:
    timesteps = torch.tensor([0, 1, 37, 999])
    half = dim // 2
    expected = torch.zeros(4, dim, dtype=torch.float64)
    for i in range(half):
        frequency = math.exp(-math.log(10000) * i / half)
        for row, t in enumerate(timesteps.tolist()):
            expected[row, i] = math.cos(t * frequency)
            expected[row, half + i] = math.sin(t * frequency)
    embedding = timestep_embedding(timesteps, dim)
    assert embedding.dtype == torch.float32 and embedding.shape == (4, dim)
    torch.testing.assert_close(embedding.double(), expected, atol=1e-4, rtol=0)
    if dim % 2:
        assert embedding[:, -1].eq(0).all()


def test_gradient_checkpointing_gives_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(unet, "checkpoint", counting_checkpoint)
    model = randomized(UNetModel.from_config(TINY_CONV)).train()
    latents, timesteps, context = inputs(TINY_CONV, size=(8, 6))
    context.requires_grad_(True)
    target = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        context.grad = None
        (model(latents, timesteps, context) - target).square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()} | {"context": context.grad.clone()}

    plain = gradients()
    assert not calls
    model.gradient_checkpointing = True
    checkpointed = gradients()
    # TINY_CONV has 10 ResBlocks and 9 SpatialTransformers, each checkpointed once.
    assert calls == [False] * 19
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)

    calls.clear()
    model.eval()
    with torch.no_grad():
        model(latents, timesteps, context)
    assert not calls


@pytest.mark.parametrize("config", [TINY, TINY_CONV])
def test_channels_last_matches_contiguous(config: dict) -> None:
    model = randomized(UNetModel.from_config(config)).eval()
    latents, timesteps, context = inputs(config, size=(8, 12))
    with torch.no_grad():
        expected = model(latents, timesteps, context)
        assert model.to_channels_last() is model
        assert model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        for batch in (latents, latents.to(memory_format=torch.channels_last)):
            output = model(batch, timesteps, context)
            torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_wrapped_blocks_still_get_their_conditioning() -> None:
    """FSDP (trainer=fsdp wraps every ResBlock and SpatialTransformer) and activation checkpointing replace the
    blocks with wrappers of another class; the UNet must still pass each its embedding or context (an H100 run
    under FSDP failed with "ResBlock.forward() missing 1 required positional argument" before)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = randomized(UNetModel.from_config(TINY)).eval()
    latents, timesteps, context = inputs(TINY, size=(8, 8))
    with torch.no_grad():
        expected = model(latents, timesteps, context)
        wrapped = 0
        for block in (*model.input_blocks, model.middle_block, *model.output_blocks):
            for i, layer in enumerate(block):
                if isinstance(layer, ResBlock | SpatialTransformer):
                    block[i] = checkpoint_wrapper(layer)
                    wrapped += 1
        assert wrapped > 0 and not any(isinstance(m, ResBlock) for m in model.middle_block)
        torch.testing.assert_close(model(latents, timesteps, context), expected)


def test_state_dict_round_trip_strict(tmp_path: Path) -> None:
    source = randomized(UNetModel.from_config(TINY_CONV), seed=0).eval()
    save_file(source.state_dict(), tmp_path / "unet.safetensors")
    target = randomized(UNetModel.from_config(TINY_CONV), seed=1).eval()
    target.load_state_dict(load_file(tmp_path / "unet.safetensors"), strict=True)
    latents, timesteps, context = inputs(TINY_CONV)
    with torch.no_grad():
        torch.testing.assert_close(target(latents, timesteps, context), source(latents, timesteps, context))


def test_from_config_accepts_released_params() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    # A released SD 2.x ``unet_config.params`` at tiny scale, as OmegaConf loads it from the YAML.
    params = omegaconf.OmegaConf.create(
        {
            "use_checkpoint": True,
            "use_fp16": True,
            "image_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 32,
            "attention_resolutions": [2, 1],
            "num_res_blocks": 1,
            "channel_mult": [1, 2],
            "num_head_channels": 16,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": 1,
            "context_dim": 64,
            "legacy": False,
            "num_heads_upsample": -1,
            "use_scale_shift_norm": False,
            "resblock_updown": False,
            "use_new_attention_order": False,
        }
    )
    model = UNetModel.from_config(params)
    assert model.gradient_checkpointing
    assert model.input_blocks[1][1].transformer_blocks[0].attn1.heads == 2
    with torch.no_grad():
        assert model.eval()(*inputs(TINY, size=(4, 6))).shape == (2, 4, 4, 6)
    assert not UNetModel(**TINY).gradient_checkpointing


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_classes": 10}, "num_classes"),
        ({"dims": 3}, "dims"),
        ({"use_spatial_transformer": False}, "use_spatial_transformer"),
        ({"use_scale_shift_norm": True}, "use_scale_shift_norm"),
        ({"disable_self_attentions": [True, True]}, "disable_self_attentions"),
        ({"learning_rate": 1e-4}, "unknown"),
        ({"num_head_channels": -1}, "num_heads or num_head_channels"),
        ({"num_head_channels": 24}, "does not divide"),
        ({"num_res_blocks": [1, 1, 1]}, "one count per level"),
        ({"norm_num_groups": 7}, "norm_num_groups=7 does not divide"),
        ({"norm_num_groups": 0}, "norm_num_groups must be >= 1"),
    ],
)
def test_from_config_rejects_what_it_cannot_build(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UNetModel.from_config(TINY | changes)


def test_norm_num_groups_sets_every_group_norm_and_keeps_the_layout() -> None:
    default, fewer = UNetModel(**TINY), UNetModel(**TINY | {"norm_num_groups": 8})
    norms = [m for m in fewer.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    assert all(m.num_groups == 32 for m in default.modules() if isinstance(m, torch.nn.GroupNorm))
    # the same parameters (a released checkpoint loads into either): only the normalization differs
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in fewer.state_dict().items()}
    with torch.no_grad():  # no zero-initialized layers, so every normalization shows in the output
        for parameter in default.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    fewer.load_state_dict(default.state_dict())
    x, t, context = inputs(TINY)
    with torch.no_grad():
        assert not torch.allclose(default.eval()(x, t, context), fewer.eval()(x, t, context))


def test_from_config_requires_context_dim() -> None:
    params = {key: value for key, value in TINY.items() if key != "context_dim"}
    with pytest.raises(ConfigError, match="context_dim"):
        UNetModel.from_config(params)


def test_forward_rejects_bad_inputs() -> None:
    model = UNetModel.from_config(TINY_THREE_LEVELS).eval()
    latents, timesteps, context = inputs(TINY_THREE_LEVELS)
    with pytest.raises(ValueError, match="context"):
        model(latents, timesteps, None)
    with pytest.raises(ValueError, match="context must be"):
        model(latents, timesteps, context[..., :32])
    with pytest.raises(ValueError, match="multiples of 4"):
        model(latents[..., :6], timesteps, context)
    with pytest.raises(ValueError, match="timesteps"):
        model(latents, timesteps[:1], context)
