"""Noise schedules of discrete-time diffusion and their continuous "sigma" view.

Discrete time (DDPM, latent diffusion): ``betas`` of T steps, ``alphas_cumprod`` (alpha-bar) and
x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) eps.

Sigma view (k-diffusion, Karras et al. 2022): x = x0 + sigma eps, with x = x_t / sqrt(alpha-bar_t) and
sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t). Samplers work on decreasing sigmas ending in 0; a
discrete-time model is called at a (fractional) timestep found by interpolating log sigma.

Tables (betas, alphas_cumprod, schedule sigmas) are float64 tensors; functions that combine them with
data cast them to the data's dtype and device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from trainer.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")

# alpha-bar used in place of an exact 0 (a zero-terminal-SNR schedule) wherever a finite sigma is needed:
# sigma = sqrt((1 - 2**-24) / 2**-24) ~ 4096, the value diffusers uses for the same purpose.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24

SIGMA_SCHEDULES = ("uniform", "leading", "trailing", "karras")


def append_dims(values: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dimensions in all, to broadcast per-sample values over data."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn from ``generator`` (on whatever device the generator
    lives, so a CPU generator gives the same numbers for data on any device) and moved to ``x``'s device."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def beta_schedule(
    name: str,
    num_timesteps: int = 1000,
    linear_start: float = 0.00085,
    linear_end: float = 0.012,
    cosine_s: float = 8e-3,
) -> Tensor:
    """The betas (float64, shape (num_timesteps,)) of a named schedule.

    - ``"linear"``: linear from ``linear_start`` to ``linear_end`` (DDPM; diffusers' "linear").
    - ``"scaled_linear"``: linear in sqrt(beta), then squared: Stable Diffusion's schedule. CompVis'
      latent-diffusion configs call this one ``"linear"``.
    - ``"cosine"``: Nichol & Dhariwal (2021), alpha-bar(t) = f(t) / f(0) with
      f(t) = cos^2(pi / 2 (t / T + s) / (1 + s)); betas clipped at 0.999.
    """
    if name == "linear":
        return torch.linspace(linear_start, linear_end, num_timesteps, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(math.sqrt(linear_start), math.sqrt(linear_end), num_timesteps, dtype=torch.float64) ** 2
    if name == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return betas.clamp(max=0.999)
    raise ConfigError(f"unknown beta schedule {name!r}; choose one of {BETA_SCHEDULES}")


def alphas_cumprod(betas: Tensor) -> Tensor:
    """alpha-bar_t = prod_{s <= t} (1 - beta_s)."""
    return torch.cumprod(1 - betas, dim=0)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2023), "Common Diffusion Noise Schedules and Sample Steps are Flawed": shift and scale
    sqrt(alpha-bar) so that its last value is exactly 0 (pure noise at t = T - 1, zero SNR) and its first is
    unchanged; returns the betas of the rescaled schedule (the last one is 1). Train such a schedule with
    the v objective: epsilon prediction is undefined at zero SNR."""
    root = alphas_cumprod(betas).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    alphas = torch.cat([rescaled[:1], rescaled[1:] / rescaled[:-1]])
    return 1 - alphas


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The forward process: x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noise, for integer
    timesteps ``t`` of shape (B,) broadcast over the other dimensions of ``x0``."""
    alpha_bar = append_dims(alphas_cumprod.to(x0.device)[t].to(x0.dtype), x0.ndim)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha-bar / (1 - alpha-bar) (= 1 / sigma^2)."""
    return alphas_cumprod / (1 - alphas_cumprod)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), increasing with t (infinite where alpha-bar is 0)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def schedule_log_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """log sigma_t of every discrete timestep, finite everywhere: a zero alpha-bar (zero terminal SNR)
    counts as :data:`ZERO_SNR_ALPHA_CUMPROD`. This table defines the sigma <-> timestep maps."""
    return sigmas_from_alphas_cumprod(alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_CUMPROD)).log()


def timestep_to_sigma(timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """sigma at (fractional) timesteps in [0, T - 1], interpolating log sigma linearly between steps."""
    log_sigmas = schedule_log_sigmas(alphas_cumprod).to(timesteps.device)
    timesteps = timesteps.to(log_sigmas.dtype).clamp(0, len(log_sigmas) - 1)
    low = timesteps.floor().long()
    high = timesteps.ceil().long()
    weight = timesteps - low
    return torch.lerp(log_sigmas[low], log_sigmas[high], weight).exp()


def sigma_to_timestep(sigma: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The fractional timestep in [0, T - 1] whose interpolated log sigma is log ``sigma`` (the inverse of
    :func:`timestep_to_sigma`; sigmas outside the schedule's range clamp to its ends). Returned in the
    dtype of the schedule (float64)."""
    log_sigmas = schedule_log_sigmas(alphas_cumprod).to(sigma.device)
    log_sigma = sigma.to(log_sigmas.dtype).log()
    high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    low = high - 1
    weight = ((log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0, 1)
    return low + weight


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``n`` sigmas from ``sigma_max`` down to ``sigma_min``, evenly spaced in sigma^(1 / rho) (Karras et al.
    2022, eq. 5); float64, no trailing zero."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_root, min_root = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_root + ramp * (min_root - max_root)) ** rho


def append_zero(sigmas: Tensor) -> Tensor:
    """Append the final sigma 0 (the clean data) to a sampling schedule."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas(alphas_cumprod: Tensor, steps: int, schedule: str = "uniform", rho: float = 7.0) -> Tensor:
    """``steps`` decreasing sigmas picked from a discrete schedule, then 0 (shape (steps + 1,), float64).

    - ``"uniform"``: timesteps evenly spaced from T - 1 down to 0, fractional where they fall between
      steps (k-diffusion's discrete schedules).
    - ``"leading"``: integer timesteps 1, 1 + T // steps, ... (Stable Diffusion's DDIM/PLMS spacing with
      steps_offset 1); never reaches T - 1, so avoid it with zero-terminal-SNR schedules.
    - ``"trailing"``: integer timesteps counted down from T - 1 in strides of T / steps (Lin et al. 2023).
    - ``"karras"``: :func:`karras_sigmas` between the schedule's smallest and largest sigma.
    """
    num_timesteps = len(alphas_cumprod)
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps must be in [1, {num_timesteps}] for a {num_timesteps}-step schedule, got {steps}")
    if schedule == "karras":
        log_sigmas = schedule_log_sigmas(alphas_cumprod)
        return append_zero(karras_sigmas(steps, log_sigmas[0].exp().item(), log_sigmas[-1].exp().item(), rho))
    if schedule == "uniform":
        timesteps = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64)
    elif schedule == "leading":
        if steps == num_timesteps:
            raise ConfigError(f"'leading' spacing needs fewer than {num_timesteps} steps; use 'uniform'")
        timesteps = (torch.arange(steps - 1, -1, -1) * (num_timesteps // steps) + 1).double()
    elif schedule == "trailing":
        timesteps = (num_timesteps - torch.arange(steps, dtype=torch.float64) * num_timesteps / steps).round() - 1
    else:
        raise ConfigError(f"unknown sigma schedule {schedule!r}; choose one of {SIGMA_SCHEDULES}")
    return append_zero(timestep_to_sigma(timesteps, alphas_cumprod))
