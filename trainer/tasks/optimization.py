"""What the tasks share about optimization: AdamW from a config and the warmup-then-cosine schedule."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from trainer.errors import ConfigError


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (a one-element tensor included; not a bool), else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_optimizer(lr: Any = None, betas: Any = None, eps: Any = None, weight_decay: Any = None) -> None:
    """Raise :class:`ConfigError` naming the ``task.optimizer`` key of a value AdamW cannot work with (None: not
    given): lr > 0, betas two numbers in [0, 1), eps >= 0, weight_decay >= 0, each finite."""
    checks = {"lr": (lr, "must be positive", lambda v: v > 0), "eps": (eps, "must be >= 0", lambda v: v >= 0)}
    checks["weight_decay"] = (weight_decay, "must be >= 0", lambda v: v >= 0)
    for key, (value, rule, good) in checks.items():
        if value is None:
            continue
        number = _number(value)
        if number is None:
            raise ConfigError(f"task.optimizer.{key} must be a number, got {value!r}")
        if not math.isfinite(number) or not good(number):
            raise ConfigError(f"task.optimizer.{key} {rule}, got {number}")
    if betas is not None:
        pair = list(betas) if isinstance(betas, Iterable) and not isinstance(betas, str) else None
        values = [_number(b) for b in pair] if pair is not None else []
        if len(values) != 2 or any(b is None or not 0 <= b < 1 for b in values):
            raise ConfigError(f"task.optimizer.betas must be two numbers in [0, 1), like [0.9, 0.999], got {betas!r}")


def check_schedule(warmup_steps: Any, total_steps: Any, min_lr_ratio: Any) -> None:
    """Raise :class:`ConfigError` naming the ``task.scheduler`` key of a value the schedule cannot work with:
    warmup_steps a whole number >= 0, total_steps (what the run's max_steps gives when null) a whole number >= 1,
    min_lr_ratio in [0, 1]. A warmup longer than the schedule is allowed (a short debug run of a long config)."""
    for key, value, least in (("warmup_steps", warmup_steps, 0), ("total_steps", total_steps, 1)):
        number = _number(value)
        if number is None or number != int(number) or number < least:
            hint = " (or trainer.max_steps > 0 when it is null)" if key == "total_steps" else ""
            raise ConfigError(f"task.scheduler.{key} must be a whole number >= {least}{hint}, got {value!r}")
    ratio = _number(min_lr_ratio)
    if ratio is None or not 0 <= ratio <= 1:
        raise ConfigError(f"task.scheduler.min_lr_ratio must be in [0, 1] (1: constant lr), got {min_lr_ratio!r}")


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier: linear warmup from ~0 to 1, then cosine decay to ``min_lr_ratio`` (1: constant). The
    values are checked by :func:`check_schedule`."""
    check_schedule(warmup_steps, total_steps, min_lr_ratio)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs


def build_adamw(params: Iterable[Any], optimizer: Mapping[str, Any], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused (one kernel over all tensors) as ``optimizer["fused"]`` says:
    true, false, or null (the default) for fused wherever every parameter is a floating-point tensor on a device
    with the kernel (CPU, CUDA). torch itself picks its per-tensor loop on the CPU, which for a small model costs
    as much as a tenth of a training step (docs/benchmarks.md). Call it once the parameters are on their device,
    as Lightning's ``configure_optimizers`` is."""
    params = [{**group, "params": list(group["params"])} if isinstance(group, dict) else group for group in params]
    for settings in (kwargs, *(group for group in params if isinstance(group, dict))):  # per-group values too
        check_optimizer(**{key: settings[key] for key in ("lr", "betas", "eps", "weight_decay") if key in settings})
    if "betas" in kwargs and not any(isinstance(b, torch.Tensor) for b in kwargs["betas"]):
        kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])  # torch refuses [0, 0.99]: an int and a float
    fused = optimizer.get("fused")
    if fused is None:
        tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        fused = bool(tensors) and all(t.is_floating_point() and t.device.type in FUSED_DEVICES for t in tensors)
    elif not isinstance(fused, bool):
        raise ConfigError(f"task.optimizer.fused must be true, false or null (auto), got {fused!r}")
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def adamw_with_schedule(
    params: Iterable[Any], optimizer: Mapping[str, Any], scheduler: Mapping[str, Any], max_steps: int | None
) -> dict:
    """Lightning's ``configure_optimizers`` answer: AdamW (lr, betas, eps, weight_decay from ``optimizer``;
    per-group settings in ``params`` win) stepped by :func:`warmup_cosine` every optimizer step."""
    adamw = build_adamw(
        params,
        optimizer,
        lr=optimizer["lr"],
        betas=tuple(optimizer["betas"]),
        eps=optimizer["eps"],
        weight_decay=optimizer["weight_decay"],
    )
    total = scheduler.get("total_steps") or max_steps
    if not total or total < 1:
        raise ConfigError("the LR schedule needs task.scheduler.total_steps or trainer.max_steps > 0")
    schedule = warmup_cosine(scheduler.get("warmup_steps", 0), total, scheduler.get("min_lr_ratio", 0.0))
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(adamw, schedule)
    return {"optimizer": adamw, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}


def ema_multi_avg_fn(decay: float):
    """EMA update for ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=...)`` with the warmup of CompVis's
    ``LitEma``: the n-th update uses ``min(decay, (1 + n) / (10 + n))``, so early on the average follows the
    weights closely instead of keeping a large share of the random initialization (after 1000 updates a fixed
    0.999 would still hold 37% of it, which is what a short run would then sample with)."""

    def multi_avg_fn(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        floating = [(a, c) for a, c in zip(averaged, current, strict=True) if torch.is_floating_point(a)]
        if floating:
            torch._foreach_lerp_([a for a, _ in floating], [c for _, c in floating], weight)
        for a, c in zip(averaged, current, strict=True):
            if not torch.is_floating_point(a):
                a.copy_(c)

    return multi_avg_fn
