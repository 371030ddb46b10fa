"""The one place preconditioning lives: a discrete-time model seen as a denoiser D(x; sigma)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from trainer.diffusion.objectives import check_objective, x0_from_output
from trainer.diffusion.schedules import append_dims, sigma_to_timestep


class DiscreteDenoiser:
    """Wrap ``model_fn(x_t, timesteps, **kwargs)``, a model trained at the discrete timesteps of
    ``alphas_cumprod`` on inputs x_t = sqrt(alpha-bar) x0 + sqrt(1 - alpha-bar) eps to predict
    ``objective`` ("eps", "v" or "x0"), as the denoiser ``D(x, sigma, **kwargs)`` of the samplers.

    For x = x0 + sigma eps it calls the model on x_t = x / sqrt(1 + sigma^2) at the fractional timestep
    whose interpolated log sigma is log sigma (:func:`~trainer.diffusion.schedules.sigma_to_timestep`), and
    converts the output to x0 using alpha-bar = 1 / (1 + sigma^2) exactly. Timesteps are not rounded: on a
    grid of schedule sigmas (``get_sigmas`` "uniform", "leading", "trailing") they come out as the
    schedule's timesteps up to float error; between grid points (Karras sigmas) the model sees fractional
    timesteps, which a sinusoidal timestep embedding accepts. ``timesteps`` reach the model as (B,) floats
    in the dtype of ``sigma``.
    """

    def __init__(self, model_fn: Callable[..., Tensor], alphas_cumprod: Tensor, objective: str = "eps"):
        check_objective(objective)
        self.model_fn = model_fn
        self.alphas_cumprod = alphas_cumprod
        self.objective = objective

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        timesteps = sigma_to_timestep(sigma, self.alphas_cumprod).to(sigma.dtype)
        signal_scale = append_dims((1 + sigma**2).rsqrt(), x.ndim)
        noise_scale = (append_dims(sigma, x.ndim) * signal_scale).to(x.dtype)
        signal_scale = signal_scale.to(x.dtype)
        x_t = x * signal_scale
        output = self.model_fn(x_t, timesteps, **kwargs)
        return x0_from_output(self.objective, output, x_t, signal_scale, noise_scale)
