"""Recording a training run on its FiftyOne dataset (through ``runs.py``): as running when it
starts, then completed with its best val IoU, or failed with the error that stopped it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from ..fiftyone_api import is_collection
from .config import TrainConfig
from .report import best_val_iou


class RecordedRun:
    """The record of a training run on its dataset (``runs.py``): ``history`` is the run's
    (filled as the epochs go), :meth:`finish` closes it."""

    def __init__(self, view, key: Optional[str]):
        self.view, self.key = view, key
        self.history: list[dict] = []

    def end(self, error: Optional[str] = None) -> None:
        if self.key is not None:
            from ..runs import record_training_end

            record_training_end(self.view, self.key, best_val_iou(self.history), len(self.history), error=error)

    def finish(self, result) -> None:
        """Close the record with ``result`` (a ``FitResult``): completed, with its history."""
        self.history = result.history
        self.end()


@contextlib.contextmanager
def recorded(view, cfg: TrainConfig, out: Path, best_dir: Path, is_main: bool):
    """Record the run on ``view``'s dataset as running (main process, FiftyOne views only), and
    as failed, with the error, if it stops with one."""
    from ..runs import record_training_start

    key = None
    if is_main and is_collection(view):
        key = record_training_start(view, cfg.to_dict(), out, best_dir)
    run = RecordedRun(view, key)
    try:
        yield run
    except BaseException as e:
        run.end(error=f"{type(e).__name__}: {e}")
        raise
