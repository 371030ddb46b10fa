"""Distributed strategies built from config: FSDP with its wrap policy named by class paths.

Which to pick (see also README, "Scaling out"): DDP (``trainer=ddp``) whenever the model, its gradients
and AdamW's two moments fit on one GPU with the activations: CLIP up to ViT-L/14, the KL autoencoder, and
the SD 1.x/2.x UNet (860 M parameters: about 14 GB of fp32 weights, gradients and moments) on 40-80 GB
GPUs. FSDP (``trainer=fsdp``) when they do not: larger UNets, 24 GB GPUs, or to free memory for larger
per-GPU batches; it shards parameters, gradients and optimizer state over the ranks at the price of more
communication per step.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence
from typing import Any

from trainer.errors import ConfigError


def import_class(path: str) -> type:
    """``"package.module.Class"`` -> the class, with a clear error for a wrong path."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(
            f"cannot import {path!r} ({error}); give a full path like trainer.models.unet.ResBlock"
        ) from error


def fsdp(
    wrap: Sequence[str] = (),
    activation_checkpointing: Sequence[str] = (),
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    cpu_offload: bool = False,
    **kwargs: Any,
):
    """Lightning's ``FSDPStrategy``: every module of a class in ``wrap`` becomes its own FSDP unit (its
    parameters are gathered just for its forward and backward), those in ``activation_checkpointing``
    recompute their activations in the backward pass. ``state_dict_type="full"`` gathers whole
    checkpoints on rank 0, which the exports and ``resume=auto`` read; "sharded" writes faster for
    very large models."""
    from pytorch_lightning.strategies import FSDPStrategy

    options: dict[str, Any] = {"sharding_strategy": sharding_strategy, "state_dict_type": state_dict_type}
    if wrap:
        options["auto_wrap_policy"] = {import_class(path) for path in wrap}
    if activation_checkpointing:
        options["activation_checkpointing_policy"] = {import_class(path) for path in activation_checkpointing}
    return FSDPStrategy(cpu_offload=cpu_offload, **options, **kwargs)


def is_fsdp(strategy: Any) -> bool:
    """Whether ``strategy`` (a Lightning strategy object) shards the model with FSDP."""
    from pytorch_lightning.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def full_parameters(strategy: Any) -> contextlib.AbstractContextManager:
    """Under FSDP, every parameter whole on every rank for the block (``summon_full_params`` of the root, not
    written back): for modules called outside the root's forward, where the parameters outside the wrapped units
    are each rank's flat shards. Every rank must enter it. Elsewhere nothing."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = getattr(strategy, "model", None)
    if is_fsdp(strategy) and isinstance(root, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(root, writeback=False)
    return contextlib.nullcontext()


def check_strategy(task: Any, strategy: Any) -> None:
    """Refuse, before any work, a task that ``strategy`` cannot run: torch's FSDP refuses 0-dim parameters
    (open_clip's ``logit_scale``, the autoencoder loss's ``logvar``), deep in its setup."""
    if not is_fsdp(strategy):
        return
    scalars = [name for name, parameter in task.named_parameters() if parameter.dim() == 0]
    if scalars:
        raise ConfigError(
            f"trainer=fsdp cannot shard {type(task).__name__}: torch's FSDP refuses 0-dim parameters "
            f"({', '.join(scalars)}). FSDP is for UNets too large for one GPU (the latent diffusion stage); train "
            "CLIP and the autoencoder with trainer=ddp, as their models fit on one GPU"
        )
