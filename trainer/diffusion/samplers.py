"""Samplers: small functions with one shared signature (the k-diffusion convention)::

    sampler(denoiser, x, sigmas, *, extra_args=None, generator=None, callback=None, **options) -> x

- ``denoiser(x, sigma, **extra_args)`` returns D(x; sigma), the estimate of x0 from x = x0 + sigma eps,
  with ``sigma`` a (B,) tensor. Wrap a discrete-time UNet with
  :class:`~trainer.diffusion.denoisers.DiscreteDenoiser`, add guidance with
  :class:`~trainer.diffusion.guidance.GuidedDenoiser`.
- ``x`` starts at the noise level ``sigmas[0]`` (for text-to-image: ``sigmas[0] * randn``).
- ``sigmas`` is 1-D and decreasing, ending in 0 (see :func:`~trainer.diffusion.schedules.get_sigmas`).
- ``generator`` draws the noise of stochastic samplers (deterministic ones ignore it).
- ``callback(step, x, denoised)`` runs after every step with the new ``x`` and the ``denoised``
  estimate that step used (to record trajectories or previews).

In this parameterisation the probability-flow ODE is dx / dsigma = (x - D(x; sigma)) / sigma. A few
identities the tests check: DDIM with eta = 0 is Euler's method on this ODE; DDIM with eta, Euler
ancestral with the same eta and (for eta = 1) DDPM's posterior take the same step, written three ways.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from trainer.diffusion.schedules import randn_like
from trainer.errors import ConfigError

Denoiser = Callable[..., Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


def _prepare(sigmas: Tensor, x: Tensor, extra_args: dict[str, Any] | None) -> tuple[Tensor, dict[str, Any]]:
    """Sigmas on ``x``'s device in at least float32 (half-precision sigmas lose the step sizes), and the
    extra arguments as a dict."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return sigmas.to(device=x.device, dtype=dtype), extra_args or {}


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split a step from ``sigma`` to ``sigma_next`` into a deterministic step down to ``sigma_down`` and
    fresh noise of standard deviation ``sigma_up``, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    sigma_up = eta sigma_next sqrt(sigma^2 - sigma_next^2) / sigma is DDIM's sigma_t(eta) divided by
    sqrt(alpha-bar_{t-1}), i.e. written for x = x_t / sqrt(alpha-bar); eta = 1 gives DDPM's posterior
    standard deviation. It is capped at sigma_next (eta > 1), and 0 where sigma does not decrease.
    """
    sigma_up = eta * sigma_next * (sigma**2 - sigma_next**2).clamp(min=0).sqrt() / sigma
    sigma_up = torch.minimum(sigma_up, sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn)."""
    sigmas, extra_args = _prepare(sigmas, x, extra_args)
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        denoised = denoiser(x, sigma.expand(x.shape[0]), **extra_args)
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_next - sigma)
        if callback is not None:
            callback(step, x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Euler steps down to ``sigma_down``, then fresh noise back up to ``sigma_next`` (see
    :func:`ancestral_step`); ``eta`` scales the fresh noise (0: plain Euler)."""
    sigmas, extra_args = _prepare(sigmas, x, extra_args)
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        denoised = denoiser(x, sigma.expand(x.shape[0]), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        if callback is not None:
            callback(step, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021): x_next = x0_hat + sigma_down eps_hat + sigma_up z, with
    eps_hat = (x - x0_hat) / sigma and the noise split of :func:`ancestral_step`.

    With ``eta`` = 0 (the default) it is deterministic, the first-order solver of the probability-flow
    ODE, and runs in either direction: given increasing sigmas starting above 0 it maps data to noise
    (DDIM inversion), and the decreasing schedule maps it back. ``eta`` = 1 is DDPM's ancestral sampling.

    In the sigma parameterisation this update is exactly Euler ancestral's (x0_hat + sigma_down eps_hat
    = x + eps_hat (sigma_down - sigma)), so it runs :func:`sample_euler_ancestral` with DDIM's default eta.
    """
    return sample_euler_ancestral(
        denoiser, x, sigmas, extra_args=extra_args, generator=generator, callback=callback, eta=eta
    )


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral sampling from DDPM's posterior q(x_next | x, x0 = D(x; sigma)) (Ho et al. 2020, with the
    posterior variance beta-tilde). For x = x_t / sqrt(alpha-bar) the posterior is Gaussian with mean
    r x + (1 - r) D and standard deviation sigma_next sqrt(1 - r), where r = sigma_next^2 / sigma^2.

    Any decreasing grid works (strided steps use the posterior between their two noise levels); the
    classic sampler is ``get_sigmas(alphas_cumprod, len(alphas_cumprod))``, every discrete timestep.
    """
    sigmas, extra_args = _prepare(sigmas, x, extra_args)
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        denoised = denoiser(x, sigma.expand(x.shape[0]), **extra_args)
        ratio = (sigma_next / sigma) ** 2
        x = ratio * x + (1 - ratio) * denoised
        if sigma_next > 0:
            x = x + sigma_next * (1 - ratio).sqrt() * randn_like(x, generator)
        if callback is not None:
            callback(step, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), the deterministic second-order multistep solver in data
    prediction. With lambda = -log sigma and h = lambda_next - lambda, each step is

        x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) D',
        D' = (1 + 1 / (2 r)) D_i - 1 / (2 r) D_{i-1},   r = h_{i-1} / h_i,

    first order (D' = D_i) on the first step and on the last step to sigma = 0.
    """
    sigmas, extra_args = _prepare(sigmas, x, extra_args)
    previous_denoised = None
    for step in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        denoised = denoiser(x, sigma.expand(x.shape[0]), **extra_args)
        if previous_denoised is None or sigma_next == 0:
            estimate = denoised
        else:
            h = (sigma / sigma_next).log()
            h_previous = (sigmas[step - 1] / sigma).log()
            half_inverse_ratio = h / (2 * h_previous)
            estimate = (1 + half_inverse_ratio) * denoised - half_inverse_ratio * previous_denoised
        ratio = sigma_next / sigma
        x = ratio * x + (1 - ratio) * estimate
        previous_denoised = denoised
        if callback is not None:
            callback(step, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler registered under ``name`` in :data:`SAMPLERS`."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def img2img_start(
    x0: Tensor,
    sigmas: Tensor,
    strength: float,
    *,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The start of image-to-image sampling: skip the first (1 - ``strength``) of the steps of ``sigmas``
    (round(strength * steps) steps remain) and noise ``x0`` to the first remaining sigma.

    Returns (x_start, sigmas_remaining). ``noise`` (shaped like ``x0``) is drawn from ``generator`` unless
    given. Strength 1 keeps every step and starts from x0 + sigmas[0] noise; strength 0 keeps none and
    returns x0 with the sigmas [0].
    """
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"img2img strength must be in [0, 1], got {strength}")
    steps = len(sigmas) - 1
    remaining = sigmas[steps - round(strength * steps) :]
    if noise is None:
        noise = randn_like(x0, generator)
    return x0 + remaining[0].to(x0) * noise, remaining
