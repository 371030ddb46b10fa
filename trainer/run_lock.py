"""One live run per run folder: a lock file that the run's first process holds while it trains.

Two runs in one folder (a second run started with the same ``hydra.run.dir`` while the first still trains)
would resume each other's in-progress checkpoints, overwrite ``config.yaml`` and the metrics, and crash. The
first process of a run (global rank 0; the other ranks train under it) takes an exclusive ``flock`` on
``<run folder>/.run.lock`` and keeps it until it exits; the kernel releases it when the process dies, however
it dies, so a requeued SLURM job or a run resumed after a crash takes the folder over by itself. The file
records who holds it (host, pid, SLURM job, start time), for the message a second run stops with.

On a shared filesystem whose locks outlive a dead node (some NFS setups), a requeued job (the same SLURM job id, a
higher ``SLURM_RESTART_COUNT``) waits ``takeover_wait`` seconds for the stale lock and then goes on without it, with
a warning: SLURM runs one attempt of a job at a time, so its predecessor is dead. Two runs of one attempt (two
``srun`` steps in one allocation) are refused like any others.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from trainer.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".run.lock"


class RunFolderInUseError(UserError, RuntimeError):
    """Another live run holds the run folder."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    parts = [f"pid {holder['pid']}" if "pid" in holder else None]
    parts.append(f"on {holder['host']}" if "host" in holder else None)
    parts.append(f"SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else None)
    parts.append(f"since {holder['started']}" if "started" in holder else None)
    return " ".join(p for p in parts if p) or "an unknown process"


def slurm_job() -> str | None:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task and "SLURM_ARRAY_JOB_ID" in os.environ else job


def _restart_count() -> int:
    """How many times SLURM has requeued this job (0 for its first attempt, and outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


class RunLock:
    """``with RunLock(folder): ...`` holds the folder's lock; :meth:`acquire` / :meth:`release` do the same."""

    def __init__(self, folder: str | os.PathLike, takeover_wait: float = 60.0) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.takeover_wait = takeover_wait
        self._fd: int | None = None
        self.held = False  # the lock is ours (False where the filesystem has none, or a stale one was passed over)

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None
        while not self._try_lock(fd):
            holder = _holder(self.path)
            job = slurm_job()
            if not job or holder.get("slurm_job") != job or holder.get("restart", 0) >= _restart_count():
                os.close(fd)
                raise RunFolderInUseError(
                    f"run folder {self.path.parent} is in use by another live run ({_describe(holder)}): stop "
                    "that run first, or start this one in a folder of its own (another hydra.run.dir, or none)"
                )
            deadline = deadline or time.monotonic() + self.takeover_wait
            if time.monotonic() >= deadline:
                log.warning(
                    "run folder %s: the lock of this job's previous attempt (%s) was not released in %.0f s; SLURM "
                    "runs one attempt of a job at a time, so it is stale: going on without it",
                    self.path.parent,
                    _describe(holder),
                    self.takeover_wait,
                )
                os.close(fd)
                return self
            time.sleep(1.0)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slurm_job": slurm_job(),
            "restart": _restart_count(),
            "started": datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def _try_lock(self, fd: int) -> bool:
        """Whether the lock is ours now; True also where the filesystem has no locks (said in a warning)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as error:  # no locks on this filesystem (some network filesystems)
            log.warning("run folder %s: cannot lock %s (%s); going on without it", self.path.parent, self.path, error)
            return True
        self.held = True
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
