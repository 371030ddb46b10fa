"""What a diffusion model predicts, how to train it, and how its output converts to x0 and noise.

With x_t = a x0 + b eps (a = sqrt(alpha-bar_t) the signal scale, b = sqrt(1 - alpha-bar_t) the noise scale,
a^2 + b^2 = 1), the three objectives are

- ``"eps"``: the noise eps;
- ``"v"``: v = a eps - b x0 (Salimans & Ho 2022), so x0 = a x_t - b v and eps = b x_t + a v;
- ``"x0"``: the clean data.

The names follow Stable Diffusion's ``parameterization``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.diffusion.schedules import append_dims
from trainer.errors import ConfigError

OBJECTIVES = ("eps", "v", "x0")


def check_objective(objective: str) -> None:
    """Raise a :class:`~trainer.errors.ConfigError` unless ``objective`` is one of :data:`OBJECTIVES`."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def signal_and_noise_scales(t: Tensor, alphas_cumprod: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(alpha-bar_t) and sqrt(1 - alpha-bar_t) for integer timesteps ``t`` (B,), shaped (B, 1, ...) to
    broadcast over ``like`` and in its dtype and device."""
    alpha_bar = append_dims(alphas_cumprod.to(like.device)[t], like.ndim)
    return alpha_bar.sqrt().to(like.dtype), (1 - alpha_bar).sqrt().to(like.dtype)


def training_target(objective: str, x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """What the model should output for x_t = q_sample(x0, t, noise): the noise, v, or x0."""
    check_objective(objective)
    if objective == "eps":
        return noise
    if objective == "x0":
        return x0
    signal_scale, noise_scale = signal_and_noise_scales(t, alphas_cumprod, x0)
    return signal_scale * noise - noise_scale * x0


def x0_from_output(objective: str, output: Tensor, x_t: Tensor, signal_scale: Tensor, noise_scale: Tensor) -> Tensor:
    """The x0 estimate implied by a model ``output`` at x_t = signal_scale x0 + noise_scale eps."""
    check_objective(objective)
    if objective == "eps":
        return (x_t - noise_scale * output) / signal_scale
    if objective == "v":
        return signal_scale * x_t - noise_scale * output
    return output


def eps_from_output(objective: str, output: Tensor, x_t: Tensor, signal_scale: Tensor, noise_scale: Tensor) -> Tensor:
    """The noise estimate implied by a model ``output`` at x_t = signal_scale x0 + noise_scale eps."""
    check_objective(objective)
    if objective == "eps":
        return output
    if objective == "v":
        return noise_scale * x_t + signal_scale * output
    return (x_t - signal_scale * output) / noise_scale


def predicted_x0(objective: str, model_output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The x0 estimate of a model output at integer timesteps ``t`` (B,)."""
    signal_scale, noise_scale = signal_and_noise_scales(t, alphas_cumprod, x_t)
    return x0_from_output(objective, model_output, x_t, signal_scale, noise_scale)


def predicted_eps(objective: str, model_output: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The noise estimate of a model output at integer timesteps ``t`` (B,)."""
    signal_scale, noise_scale = signal_and_noise_scales(t, alphas_cumprod, x_t)
    return eps_from_output(objective, model_output, x_t, signal_scale, noise_scale)


def min_snr_weight(snr_t: Tensor, gamma: float, objective: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the MSE on each objective's output, so that
    every objective weighs the x0 error by min(SNR, gamma):

    - ``"eps"``: min(SNR, gamma) / SNR (1 where SNR is 0);
    - ``"v"``: min(SNR, gamma) / (SNR + 1);
    - ``"x0"``: min(SNR, gamma).
    """
    check_objective(objective)
    if objective == "eps":
        return (gamma / snr_t).clamp(max=1.0)
    clipped = snr_t.clamp(max=gamma)
    if objective == "v":
        return clipped / (snr_t + 1)
    return clipped


def offset_noise(
    shape: tuple[int, ...] | torch.Size,
    strength: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Training noise with a random per-channel offset (Guttenberg 2023): randn(shape) + strength *
    randn(B, C, 1, ...), which lets the model learn to change an image's mean brightness. With strength 0
    it is plain randn(shape) from the same generator."""
    draw_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=draw_device, dtype=dtype)
    offset = torch.randn((*shape[:2], *(1,) * (len(shape) - 2)), generator=generator, device=draw_device, dtype=dtype)
    noise = noise + strength * offset
    return noise if device is None else noise.to(device)


def diffusion_loss(model_output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error (B,) in float32 or wider, times a per-sample ``weight`` (B,) when given."""
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    loss = (model_output.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(dim=1)
    return loss if weight is None else loss * weight.to(loss.dtype)
