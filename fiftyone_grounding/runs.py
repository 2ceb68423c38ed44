"""What trained, wrote and scored what, recorded on the dataset as FiftyOne custom runs.

FiftyOne keeps custom runs with the dataset (``dataset.list_runs()``, ``get_run_info(key)``,
``load_run_view(key)``): each holds a config and the view it ran on. This package records

- every training run on a FiftyOne view (``fit``, the train operator): key ``train_<run folder>``,
  method ``fiftyone_grounding.train``, with the training config, the run folder, its ``best/``
  checkpoint, the best validation IoU and the run's status (running, completed, failed);
- every field its apply paths write (``apply_grounding_model``, ``ground_phrase``,
  ``search_phrase``, the operators and the panel): key ``labels_<field>``, method
  ``fiftyone_grounding.labels``, with the checkpoint (or zoo model) that wrote it, the phrase
  source and the thresholds below which no box was written (``score_thresh``: a multi-box
  model's, None for a one-box model; ``confidence_thresh``); a later write to the field replaces
  the record;
- every label-error scoring (``qa.label_errors.compute_label_errors``): key
  ``label_errors_<field>``, method ``fiftyone_grounding.label_errors``, with the checkpoints that
  scored it, the folds, the estimated error rate and the counts;
- every grounding evaluation (``evaluate_in_fiftyone``): key ``eval_<eval key>``, method
  ``fiftyone_grounding.evaluate``, with the fields it compared, the fields it wrote and the
  checkpoint behind the predictions.

:func:`checkpoint_of` answers "which checkpoint wrote this field?", :func:`written_from` "from which
confidence were its boxes written?", :func:`training_checkpoints` "which models did this dataset train, latest first?".
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional
from .fiftyone_api import root_dataset

TRAIN_METHOD = "fiftyone_grounding.train"
LABELS_METHOD = "fiftyone_grounding.labels"
EVALUATE_METHOD = "fiftyone_grounding.evaluate"
LABEL_ERRORS_METHOD = "fiftyone_grounding.label_errors"
_NOT_KEY = re.compile(r"[^A-Za-z0-9_]")


def _key(prefix: str, name: str) -> str:
    """A run key (a Python identifier) for ``name``."""
    return f"{prefix}_{_NOT_KEY.sub('_', str(name))}"


def training_run_key(out_dir) -> str:
    """``train_<folder name>_<6 hex digits of its full path>``: one key per run folder (a resumed
    run keeps its key, two folders of the same name get two)."""
    from pathlib import Path

    path = Path(out_dir).expanduser().resolve()
    return _key("train", f"{path.name}_{hashlib.sha256(str(path).encode()).hexdigest()[:6]}")


def labels_run_key(label_field: str) -> str:
    return _key("labels", label_field)


def evaluation_run_key(eval_key: str) -> str:
    return _key("eval", eval_key)


def _register(samples, key: str, method: str, **config) -> None:
    samples.register_run(key, samples.init_run(method=method, **config), overwrite=True)


def _update(samples, key: str, method: str, **config) -> None:
    dataset = root_dataset(samples)
    if not dataset.has_run(key):
        return
    current = {k: v for k, v in dataset.get_run_info(key).config.serialize().items()
               if k not in ("cls", "type", "method")}
    dataset.update_run_config(key, dataset.init_run(method=method, **{**current, **config}))


def record_training_start(view, train_config: dict, out_dir, best_dir) -> str:
    """Record a training run on ``view`` as started (its folders by absolute path: other
    processes, such as the App's server, read them); returns its key."""
    from pathlib import Path

    key = training_run_key(out_dir)
    out_dir, best_dir = (Path(p).expanduser().resolve() for p in (out_dir, best_dir))
    _register(view, key, TRAIN_METHOD, status="running", out_dir=str(out_dir), checkpoint=str(best_dir),
              best_val_iou=None, epochs_done=0, train_config=train_config, error=None)
    return key


def record_training_end(view, key: str, best_val_iou: Optional[float], epochs_done: int,
                        error: Optional[str] = None) -> None:
    """Record how the training run ``key`` ended: its best val IoU, or the error that stopped it."""
    _update(view, key, TRAIN_METHOD, status="failed" if error else "completed", error=error,
            best_val_iou=None if best_val_iou is None else float(best_val_iou), epochs_done=int(epochs_done))


def record_labels(view, label_field: str, model_source: Optional[str], **how) -> str:
    """Record that ``model_source`` (a checkpoint folder or zoo name) wrote ``label_field`` on
    ``view``; ``how``: the phrase source (``prompt_field=...`` or ``phrase=...``) and options, among
    them the apply paths' ``score_thresh`` and ``confidence_thresh`` (:func:`written_from`).
    Returns the run key."""
    key = labels_run_key(label_field)
    _register(view, key, LABELS_METHOD, label_field=label_field, checkpoint=model_source, **how)
    return key


def record_evaluation(view, eval_key: str, pred_field: str, gt_field: str, fields: list, metrics: dict) -> str:
    """Record a grounding evaluation, with the checkpoint that wrote ``pred_field``."""
    key = evaluation_run_key(eval_key)
    _register(view, key, EVALUATE_METHOD, eval_key=eval_key, pred_field=pred_field, gt_field=gt_field,
              checkpoint=checkpoint_of(view, pred_field), fields=list(fields), metrics=metrics)
    return key


def label_errors_run_key(field: str) -> str:
    return _key("label_errors", field)


def record_label_errors(view, field: str, **how) -> str:
    """Record a label-error scoring of ``view`` into ``field`` (the checkpoints that scored it,
    the folds, the estimated error rate, counts); returns its key."""
    key = label_errors_run_key(field)
    _register(view, key, LABEL_ERRORS_METHOD, field=field, **how)
    return key


def latest_label_errors(samples) -> Optional[dict]:
    """``{"field": ..., "gt_field": ...}`` of the latest label-error scoring recorded on
    ``samples``' dataset, or None."""
    dataset = root_dataset(samples)
    runs = [dataset.get_run_info(key) for key in dataset.list_runs(method=LABEL_ERRORS_METHOD)]
    if not runs:
        return None
    config = max(runs, key=lambda info: info.timestamp).config
    return {"field": getattr(config, "field", "label_error"), "gt_field": getattr(config, "gt_field", None)}


def checkpoint_of(samples, label_field: str) -> Optional[str]:
    """The checkpoint (or zoo model) that last wrote ``label_field`` through this package, or None."""
    dataset = root_dataset(samples)
    key = labels_run_key(label_field)
    if not dataset.has_run(key):
        return None
    return getattr(dataset.get_run_info(key).config, "checkpoint", None)


def training_checkpoints(samples) -> list[str]:
    """The ``best/`` checkpoints recorded (by absolute path) by the training runs on ``samples``'
    dataset, the latest started first; whether each exists on disk is the caller's question."""
    from pathlib import Path

    dataset = root_dataset(samples)
    runs = [dataset.get_run_info(key) for key in dataset.list_runs(method=TRAIN_METHOD)]
    paths = [getattr(info.config, "checkpoint", None) for info in sorted(runs, key=lambda info: info.timestamp,
                                                                          reverse=True)]
    return [path for path in paths if path and Path(path).is_absolute()]  # a relative path names no folder


def written_from(samples, label_field: str) -> Optional[float]:
    """The confidence from which the boxes of ``label_field`` were written, from its record: the
    higher of the ``score_thresh`` (a multi-box model's) and the ``confidence_thresh`` that the
    apply path recorded (0.0: every box was written). None where no record says: the field was
    not written by this package's apply paths (e.g. FiftyOne's own ``apply_model``), or before
    they recorded ``score_thresh``."""
    dataset = root_dataset(samples)
    key = labels_run_key(label_field)
    if not dataset.has_run(key):
        return None
    config = dataset.get_run_info(key).config
    if not hasattr(config, "score_thresh"):
        return None
    return max(float(getattr(config, "score_thresh", None) or 0.0),
               float(getattr(config, "confidence_thresh", None) or 0.0))
