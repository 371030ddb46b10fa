"""The KL autoencoder: released Stable Diffusion VAE layout, posterior maths, shapes, checkpointing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from trainer.errors import ConfigError
from trainer.models import autoencoder
from trainer.models.autoencoder import KL_F4, SD_KL_F8, TINY, AttnBlock, AutoencoderKL, DiagonalGaussian

# Parameters of the released SD 1.x / 2.x VAE (the first_stage_model of an SD checkpoint, no loss modules).
SD_VAE_PARAMETERS = 83_653_863
SD_VAE_TENSORS = 248

# A sample of the released checkpoint's ``first_stage_model.*`` keys (prefix removed) and their shapes.
SD_VAE_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_in.bias": (128,),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.1.block.0.nin_shortcut.bias": (256,),
    "encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.down.3.block.1.norm2.bias": (512,),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.k.bias": (512,),
    "encoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.block_2.norm2.weight": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "encoder.conv_out.bias": (8,),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.block_1.norm1.weight": (512,),
    "decoder.mid.attn_1.proj_out.bias": (512,),
    "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.2.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.conv1.weight": (256, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "quant_conv.bias": (8,),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "post_quant_conv.bias": (4,),
}

# Keys the released layout does not have: no shortcut where channels stay, no resampling at the ends.
SD_VAE_ABSENT = [
    "encoder.down.0.block.0.nin_shortcut.weight",
    "encoder.down.3.downsample.conv.weight",
    "decoder.up.0.upsample.conv.weight",
    "decoder.up.3.block.0.nin_shortcut.weight",
]


def with_ddconfig(config: dict, **changes) -> dict:
    """A copy of ``config`` with ``ddconfig`` entries replaced."""
    config = copy.deepcopy(config)
    config["ddconfig"].update(changes)
    return config


TINY_F4 = with_ddconfig(TINY, ch_mult=[1, 2, 4], z_channels=3) | {"embed_dim": 3}


@pytest.fixture(scope="module")
def sd_meta() -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL.from_config(SD_KL_F8)


def test_sd_vae_parameter_count(sd_meta: AutoencoderKL) -> None:
    assert sum(p.numel() for p in sd_meta.parameters()) == SD_VAE_PARAMETERS
    assert len(sd_meta.state_dict()) == SD_VAE_TENSORS


def test_sd_vae_key_names_and_shapes(sd_meta: AutoencoderKL) -> None:
    state = sd_meta.state_dict()
    shapes = {key: tuple(state[key].shape) for key in SD_VAE_KEYS if key in state}
    assert shapes == SD_VAE_KEYS
    assert not [key for key in SD_VAE_ABSENT if key in state]
    assert all(key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for key in state)
    assert len(sd_meta.decoder.up) == 4 and all(len(level.block) == 3 for level in sd_meta.decoder.up)
    assert sd_meta.downsample_factor == 8 and sd_meta.latent_channels == 4 and sd_meta.out_channels == 3
    assert sd_meta.last_layer is sd_meta.decoder.conv_out.weight


def test_kl_f4_layout() -> None:
    with torch.device("meta"):
        model = AutoencoderKL.from_config(KL_F4)
    state = model.state_dict()
    assert model.downsample_factor == 4 and model.latent_channels == 3
    assert tuple(state["encoder.conv_out.weight"].shape) == (6, 512, 3, 3)
    assert tuple(state["quant_conv.weight"].shape) == (6, 6, 1, 1)
    assert tuple(state["post_quant_conv.weight"].shape) == (3, 3, 1, 1)
    assert "decoder.up.2.upsample.conv.weight" in state and "decoder.up.3.block.0.conv1.weight" not in state


def test_sd_vae_forward_at_64px_non_square() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(**SD_KL_F8).eval()
    with torch.no_grad():
        reconstruction, posterior = model(torch.randn(1, 3, 64, 48), sample_posterior=False)
    assert posterior.mean.shape == (1, 4, 8, 6)
    assert reconstruction.shape == (1, 3, 64, 48)


def gaussian(batch: int = 3, channels: int = 4, seed: int = 0) -> DiagonalGaussian:
    generator = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(batch, 2 * channels, 5, 6, generator=generator))


def test_kl_to_standard_normal_matches_closed_form() -> None:
    posterior = gaussian()
    expected = kl_divergence(Normal(posterior.mean, posterior.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert posterior.kl().shape == (3,)
    torch.testing.assert_close(posterior.kl(), expected)


def test_kl_between_gaussians_matches_closed_form() -> None:
    p, q = gaussian(seed=1), gaussian(seed=2)
    expected = kl_divergence(Normal(p.mean, p.std), Normal(q.mean, q.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(q), expected)
    torch.testing.assert_close(p.kl(p), torch.zeros(3))


def test_nll_matches_log_prob() -> None:
    posterior = gaussian()
    x = torch.randn_like(posterior.mean)
    expected = -Normal(posterior.mean, posterior.std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.nll(x), expected)


def test_logvar_is_clamped_and_mode_is_mean() -> None:
    moments = torch.cat([torch.randn(2, 4, 3, 3), torch.full((2, 2, 3, 3), 100.0), torch.full((2, 2, 3, 3), -100.0)], 1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar[:, :2].eq(20.0).all() and posterior.logvar[:, 2:].eq(-30.0).all()
    torch.testing.assert_close(posterior.var, torch.exp(posterior.logvar))
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * posterior.logvar))
    assert posterior.mode() is posterior.mean


def test_sample_statistics_and_generator() -> None:
    mean, logvar = torch.full((1, 2, 100, 100), 1.5), torch.full((1, 2, 100, 100), math.log(0.25))
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    samples = posterior.sample(torch.Generator().manual_seed(0))
    assert samples.shape == mean.shape
    assert abs(samples.mean().item() - 1.5) < 0.02
    assert abs(samples.std().item() - 0.5) < 0.02
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(0)), samples)


@pytest.mark.parametrize(
    ("config", "size", "latent"),
    [
        (TINY, (64, 64), (4, 8, 8)),
        (TINY, (32, 56), (4, 4, 7)),
        (TINY_F4, (32, 32), (3, 8, 8)),
        (TINY_F4, (24, 40), (3, 6, 10)),
        (with_ddconfig(TINY, attn_resolutions=[32, 8]), (48, 32), (4, 6, 4)),
    ],
)
def test_encode_decode_shapes(config: dict, size: tuple[int, int], latent: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(config).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == (2, *latent)
        assert model.decode(posterior.sample()).shape == x.shape
        reconstruction, _ = model(x)
    assert reconstruction.shape == x.shape
    assert model.latent_channels == latent[0]
    assert model.downsample_factor == size[0] // latent[1]


def test_attention_blocks_follow_attn_resolutions() -> None:
    model = AutoencoderKL.from_config(with_ddconfig(TINY, attn_resolutions=[32]))
    assert [len(level.attn) for level in model.encoder.down] == [0, 1, 0, 0]
    assert [len(level.attn) for level in model.decoder.up] == [0, 2, 0, 0]
    assert "encoder.down.1.attn.0.q.weight" in model.state_dict()


def test_attn_type_none_drops_the_mid_block_attention() -> None:
    """CompVis's ``attn_type: none``: no global attention, so a model trained on crops sees whole images through
    the same local operations (global attention over more tokens than in training breaks their decoding)."""
    config = with_ddconfig(TINY_F4, attn_type="none")
    model = AutoencoderKL.from_config(config).eval()
    assert isinstance(model.encoder.mid.attn_1, torch.nn.Identity) and isinstance(
        model.decoder.mid.attn_1, torch.nn.Identity
    )
    assert not any(".attn_1." in key for key in model.state_dict())
    assert model.ddconfig["attn_type"] == "none"  # kept in the config that exports carry
    rebuilt = AutoencoderKL.from_config({"embed_dim": 3, "ddconfig": model.ddconfig})
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    with_attention = AutoencoderKL.from_config(TINY_F4).state_dict().keys()
    assert with_attention - model.state_dict().keys() == {k for k in with_attention if ".attn_1." in k}
    assert "attn_type" not in AutoencoderKL.from_config(TINY_F4).ddconfig  # vanilla: the released layout
    with torch.no_grad():
        assert model.decode(model.encode(torch.randn(1, 3, 48, 80)).mode()).shape == (1, 3, 48, 80)


def test_norm_num_groups_sets_the_groups_and_is_kept_in_the_config() -> None:
    model = AutoencoderKL.from_config(with_ddconfig(TINY_F4, norm_num_groups=8))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    assert model.ddconfig["norm_num_groups"] == 8
    rebuilt = AutoencoderKL.from_config({"embed_dim": 3, "ddconfig": model.ddconfig})
    assert all(m.num_groups == 8 for m in rebuilt.modules() if isinstance(m, torch.nn.GroupNorm))
    assert "norm_num_groups" not in AutoencoderKL.from_config(TINY_F4).ddconfig  # SD's 32: the released layout
    with pytest.raises(ConfigError, match="norm_num_groups"):
        AutoencoderKL.from_config(with_ddconfig(TINY_F4, norm_num_groups=12))


def test_norm_num_groups_zero_removes_every_normalization_layer() -> None:
    model = AutoencoderKL.from_config(with_ddconfig(TINY_F4, norm_num_groups=0))
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any("norm" in key for key in model.state_dict())
    assert model.ddconfig["norm_num_groups"] == 0
    rebuilt = AutoencoderKL.from_config({"embed_dim": 3, "ddconfig": model.ddconfig})
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 48))[0].shape == (2, 3, 32, 48)
    with pytest.raises(ConfigError, match="norm_num_groups"):
        AutoencoderKL.from_config(with_ddconfig(TINY_F4, norm_num_groups=-1))


def test_sdpa_attention_equals_naive_softmax() -> None:
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 7)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (block.q, block.k, block.v))  # (B, HW, C)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(32), dim=-1)  # (B, HW, HW)
        attended = (weights @ v).transpose(1, 2).reshape(2, 32, 5, 7)
        expected = x + block.proj_out(attended)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(autoencoder, "checkpoint", counting_checkpoint)
    torch.manual_seed(0)
    config = with_ddconfig(TINY, attn_resolutions=[16])
    model = AutoencoderKL.from_config(config).train()
    x = torch.randn(2, 3, 32, 32)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        reconstruction, posterior = model(x, sample_posterior=False)
        (reconstruction.square().mean() + posterior.kl().mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    assert not calls
    model.gradient_checkpointing = True
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    checkpointed = gradients()
    assert calls and set(calls) == {False}
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)

    calls.clear()
    model.eval()
    with torch.no_grad():
        model(x)
    assert not calls


def test_constructor_flag_enables_checkpointing() -> None:
    model = AutoencoderKL(**TINY, gradient_checkpointing=True)
    assert model.gradient_checkpointing and model.decoder.gradient_checkpointing


def test_channels_last_gives_the_same_outputs_in_either_input_layout() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL.from_config(with_ddconfig(TINY, attn_resolutions=[16])).eval()
    images, latents = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        expected_mean, expected_images = model.encode(images).mean, model.decode(latents)
        assert model.to_channels_last() is model and model.channels_last
        assert model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.testing.assert_close(model.encode(images.contiguous(memory_format=layout)).mean, expected_mean)
            decoded = model.decode(latents.contiguous(memory_format=layout))
            torch.testing.assert_close(decoded, expected_images, atol=1e-5, rtol=1e-5)
        # State dicts keep the released layout's shapes; a channels_last model loads into an NCHW one exactly.
        plain = AutoencoderKL.from_config(with_ddconfig(TINY, attn_resolutions=[16])).eval()
        plain.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(plain.encode(images).mean, expected_mean)


def test_state_dict_round_trip_strict() -> None:
    torch.manual_seed(0)
    source = AutoencoderKL.from_config(TINY).eval()
    torch.manual_seed(1)
    target = AutoencoderKL.from_config(TINY).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x, sample_posterior=False)[0], source(x, sample_posterior=False)[0])


def test_from_config_accepts_released_params() -> None:
    params = copy.deepcopy(TINY) | {
        "monitor": "val/rec_loss",
        "lossconfig": {"target": "torch.nn.Identity"},
    }
    params["ddconfig"]["attn_type"] = "vanilla-xformers"
    model = AutoencoderKL.from_config(params)
    assert model.latent_channels == 4
    assert not any("loss" in key for key in model.state_dict())
    assert AutoencoderKL(embed_dim=4, ddconfig=TINY["ddconfig"], lossconfig={"target": "torch.nn.Identity"})


@pytest.mark.parametrize(
    "params",
    [
        copy.deepcopy(TINY) | {"learning_rate": 1e-4},
        with_ddconfig(TINY, attn_type="linear"),
        with_ddconfig(TINY, double_z=False),
        with_ddconfig(TINY, use_checkpoint=True),
    ],
)
def test_from_config_rejects_what_it_cannot_build(params: dict) -> None:
    with pytest.raises(ConfigError):
        AutoencoderKL.from_config(params)
