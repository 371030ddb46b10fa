"""How a task runs its module: ``task.compile`` (``torch.compile`` for the module a task trains, from its config),
and :func:`forward_context`, the training precision for the forward passes the tasks make outside a step.

The tasks compile in place (``nn.Module.compile``), so parameter names, checkpoints, exports, EMA copies and
LoRA adapters see the plain module; only its ``__call__`` runs through the compiled graph. The value is one of

- ``false`` / ``null``: eager (the default);
- ``true``: ``torch.compile`` with its defaults (inductor, mode ``default``);
- a mapping of ``torch.compile`` keywords, e.g. ``{mode: max-autotune-no-cudagraphs, dynamic: false}``.

The first step is slow while the graphs compile (about 3 minutes for SD 1.5's UNet on an H100); validation
sampling at other batch sizes compiles again. ``docs/benchmarks.md`` records what it gains.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from trainer.errors import ConfigError

#: torch.compile's keywords, read off its signature (``model`` is the module itself)
COMPILE_KEYS = frozenset(inspect.signature(torch.compile).parameters) - {"model"}


def compile_options(value: Any, source: str = "task.compile") -> dict[str, Any] | None:
    """The ``torch.compile`` keywords that ``value`` (a ``task.compile`` setting) asks for, or None for eager."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - COMPILE_KEYS)
        if unknown:
            raise ConfigError(
                f"{source} has keys torch.compile does not take: {unknown}; it takes {sorted(COMPILE_KEYS)}"
            )
        return dict(value)
    raise ConfigError(f"{source} must be true, false or a mapping of torch.compile keywords, got {value!r}")


def compile_in_place(module: torch.nn.Module, value: Any, source: str = "task.compile") -> bool:
    """Compile ``module``'s calls in place when ``value`` asks for it (see :func:`compile_options`); returns
    whether it did. Call it after the copies of the module are made (EMA), so that they stay eager."""
    options = compile_options(value, source)
    if options is None:
        return False
    module.compile(**options)
    return True


def forward_context(task: Any) -> contextlib.AbstractContextManager:
    """The autocast that Lightning's precision plugin wraps every step in, for the forward passes a task makes
    outside one (validation sample grids, zero-shot classifiers in ``on_validation_epoch_end``): under FSDP's
    mixed precision the gathered weights are bf16/fp16, and a float32 input outside autocast fails ("expected
    scalar type Float but found BFloat16", seen on an H100). Nothing outside a trainer."""
    trainer = getattr(task, "_trainer", None)
    return trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
