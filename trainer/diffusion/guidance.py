"""Classifier-free guidance (Ho & Salimans 2022): push the conditional prediction away from the
unconditional (or negative-prompt) one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def classifier_free_guidance(cond_out: Tensor, uncond_out: Tensor, scale: float) -> Tensor:
    """uncond + scale (cond - uncond). Computed with ``torch.lerp``, which is exact at both ends: scale 1
    returns ``cond_out`` and scale 0 ``uncond_out``, bit for bit."""
    return torch.lerp(uncond_out, cond_out, scale)


class GuidedDenoiser:
    """A denoiser with classifier-free guidance of strength ``scale``, called as
    ``guided(x, sigma, context=c, uncond_context=u, **kwargs)``.

    The unconditional (or negative-prompt) and conditional halves run as one batch of 2B: the wrapped
    ``denoiser`` sees x and sigma repeated, ``context=cat([u, c])``, and every other tensor argument
    repeated along the batch dimension (other arguments are passed as they are). An ``uncond_context``
    with batch size 1 is shared by the whole batch. At scale 1 the unconditional half is skipped and the
    result is the conditional prediction itself.
    """

    def __init__(self, denoiser: Callable[..., Tensor], scale: float):
        self.denoiser = denoiser
        self.scale = scale

    def __call__(self, x: Tensor, sigma: Tensor, *, context: Tensor, uncond_context: Tensor, **kwargs: Any) -> Tensor:
        if self.scale == 1:
            return self.denoiser(x, sigma, context=context, **kwargs)
        uncond_context = uncond_context.expand(context.shape[0], *uncond_context.shape[1:])
        doubled = {
            key: torch.cat([value, value]) if isinstance(value, Tensor) else value for key, value in kwargs.items()
        }
        output = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), context=torch.cat([uncond_context, context]), **doubled
        )
        uncond_out, cond_out = output.chunk(2)
        return classifier_free_guidance(cond_out, uncond_out, self.scale)
