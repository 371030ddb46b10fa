"""What the training entry point says instead of a traceback: one line for an error the user can act on (bad input
or configuration, a full disk, a rank that died under DDP), and overrides Hydra's parser would reject unhelpfully."""

from __future__ import annotations

import os
import re

import pytorch_lightning as pl
from hydra.errors import InstantiationException

from trainer.checkpoints import disk_full_error
from trainer.errors import UserError


class PeerFailureError(UserError, RuntimeError):
    """Another process of a multi-process run stopped, and a collective of this one failed with it."""


# What gloo and NCCL say when the process at the other end of a collective is gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_failure(error: BaseException, trainer: pl.Trainer) -> PeerFailureError | None:
    """One line for a rank whose collective failed because another rank died, instead of gloo's traceback."""
    import subprocess

    import torch.distributed as dist

    if trainer.world_size < 2 or isinstance(error, UserError) or not isinstance(error, (RuntimeError, dist.DistError)):
        return None
    rank = trainer.global_rank
    dead = []
    # the processes of local ranks 1, 2, ... that rank 0 started (Lightning's subprocess launcher); a killed one
    # closes its sockets an instant before it can be reaped
    for local_rank, process in enumerate(getattr(trainer.strategy.launcher, "procs", None) or [], start=1):
        try:
            code = process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            how = f"killed by {signal_name(-code)}" if code < 0 else f"exit code {code}"
            how += ", often the kernel's out-of-memory killer" if code == -9 else ""
            dead.append(f"local rank {local_rank} ({how})")
    if rank != 0 and os.getppid() == 1:
        dead.append("rank 0 (the process that started this one)")
    if not dead and not any(marker in str(error) for marker in _PEER_GONE):
        return None  # a timeout or desync, not a death: its own traceback says more
    which = ", ".join(dead) if dead else "another rank"
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return PeerFailureError(
        f"rank {rank} of {trainer.world_size} stopped: {which} of this run died, and the collective it was in "
        f"failed ({type(error).__name__}: {first}); that rank's own output says why it died. Resume with the same "
        "command: resume=auto continues from the last checkpoint"
    )


def signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# An override's value holding a brace range, unquoted for Hydra: {0..9}, {000..099}
_BRACE_RANGE = re.compile(r"\{\d+\.\.\d+\}")


def check_brace_overrides(argv: list[str]) -> str | None:
    """The message for an override whose value has a brace pattern outside quotes, which Hydra's parser reads as
    the start of a dictionary and rejects with a grammar error (or, expanded by the shell, as several values of one
    key, of which it silently keeps the last); None when every override is fine."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key.startswith("-"):
            continue
        unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "", value)  # what Hydra parses outside quoted strings
        if not _BRACE_RANGE.search(unquoted):
            continue
        if value.startswith(("[", "{")):
            example = "[{urls: 'a/{000..099}.tar', weight: 3}]"
            return (
                f"the override {key}= holds a brace pattern outside quotes, which Hydra reads as a dictionary: "
                f'quote each pattern inside it for Hydra, e.g. {key}="{example}"'
            )
        return (
            f"the override {arg!r} holds a brace pattern, which Hydra reads as a dictionary: quote the value for "
            f"Hydra inside the shell's quotes, e.g. {key}=\"'{value}'\""
        )
    keys = [a.partition("=")[0] for a in argv if "=" in a and not a.startswith("-")]
    for key in dict.fromkeys(keys):
        if keys.count(key) > 1 and key.endswith("urls"):
            return (
                f"{key} is given {keys.count(key)} times: the shell expanded an unquoted brace pattern into one "
                f"argument per shard; quote it for the shell and for Hydra, e.g. "
                f"{key}=\"'/data/shards/{{00000..00099}}.tar'\""
            )
    return None


def user_message(error: BaseException) -> str | None:
    """One line for an error the user can act on: a :class:`UserError` (itself, or the cause of Hydra's
    InstantiationException around a constructor's error), or a write that found the disk full."""
    found = user_error(error)
    if found is not None:
        return str(found)
    full = disk_full_error(error)
    if full is not None:
        where = full.filename
        return (
            f"no space left on device{f' writing {where}' if where else ''}: free space there or move the run "
            "(paths.output_dir, paths.root_dir or hydra.run.dir), then resume with the same command"
        )
    return None


def user_error(error: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``error``: itself, or its cause when Hydra's instantiate wrapped an error
    raised in a constructor (a task's or the datamodule's) into an InstantiationException."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__ if isinstance(error, InstantiationException) else None
    return error
