"""Loggers that continue a resumed run's history instead of starting it over.

Lightning's CSVLogger deletes ``metrics.csv`` when it starts in a folder that has one, so a run resumed after a
preemption or a crash (``resume=auto``) lost everything logged before. TensorBoard keeps old event files, but
the steps logged after the checkpoint and before the kill then appear twice. Here a run that starts from step
``N`` keeps the history logged before step ``N`` and drops what the interrupted run logged from step ``N`` on
(those steps are trained, and logged, again), so the dashboards show one continuous run. :func:`continue_logs`
tells each logger the step before it writes; :func:`trainer.train.train` calls it with the step of the checkpoint
it resumes from (0 for a fresh run, which starts a fresh history). Told nothing (a resume from a URL, whose step is
not known before it is fetched), the CSV logger keeps the whole file and appends. wandb continues its run by id (``<run>/wandb_id``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from typing import Any

from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)


class ContinuingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is kept up to ``start_step`` (exclusive) and the
    new rows are appended after it; the file is rewritten once, atomically, with the kept rows."""

    def __init__(self, log_dir: str, start_step: int | None = None) -> None:
        self.start_step = start_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        self._kept: list[dict[str, str]] = []
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        limit = float("inf") if self.start_step is None else self.start_step  # None: keep every row
        self._kept = [row for row in rows if _step(row) is not None and _step(row) < limit]
        dropped = len(rows) - len(self._kept)
        if self._kept:
            log.info(
                "metrics.csv: continuing the %d rows logged before step %d%s",
                len(self._kept),
                self.start_step,
                f" ({dropped} logged after it are logged again)" if dropped else "",
            )
        self._rewrite_kept()

    def _rewrite_kept(self) -> None:
        keys = sorted({key for row in self._kept for key in row})
        self.metrics_keys = keys
        if not self._kept:
            self._fs.rm_file(self.metrics_file_path)
            return
        tmp = f"{self.metrics_file_path}.tmp"
        with self._fs.open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self._kept)
        self._fs.mv(tmp, self.metrics_file_path)  # a kill while rewriting leaves the old file, not a partial one


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger with a history that survives a resume (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_step: int | None = None

    def continue_from(self, step: int) -> None:
        if self._experiment is not None:
            raise RuntimeError("continue_from must be called before the logger writes")
        self.start_step = step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.local_rank_is_zero():
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingExperimentWriter(self.log_dir, self.start_step)
        return super().experiment

    @staticmethod
    def local_rank_is_zero() -> bool:
        from pytorch_lightning.utilities import rank_zero_only

        return rank_zero_only.rank == 0


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger; a resumed run tells TensorBoard to discard the events the interrupted run
    wrote from the resumed step on (SummaryWriter's ``purge_step``), so no step is shown twice."""

    def continue_from(self, step: int) -> None:
        if self._experiment is not None:
            raise RuntimeError("continue_from must be called before the logger writes")
        if step > 0:
            self._kwargs["purge_step"] = step


def continue_logs(loggers: Iterable[Any], step: int) -> None:
    """Tell every logger that can continue a history the step this run starts from."""
    for logger in loggers:
        if hasattr(logger, "continue_from"):
            logger.continue_from(step)
