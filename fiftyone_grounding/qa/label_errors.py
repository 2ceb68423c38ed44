"""``compute_label_errors``: the probability that each sample's annotation is wrong.

    from fiftyone_grounding import compute_label_errors
    result = compute_label_errors(dataset, preset="tiny", folds=5, train_options={"epochs": 10})
    session.view = result.view  # the most likely errors first

Per sample it writes (``field`` = ``label_error`` by default):

- ``label_error``: P(the annotation is wrong), for the view's own error rate (``combine.py``);
- ``label_error_kind``: its most likely kind: ``wrong_object`` (the box is on another object than
  the phrase names), ``bad_box`` (the right object, a poor box), ``no_target`` (the phrase names
  nothing in the image), or ``ambiguous`` (a multi-box model finds several objects for it);
- ``label_error_driver``: what drove the score: ``disagreement`` (the model is sure of a box
  elsewhere), ``given_box`` (the model's judgement of the annotated box itself), ``ambiguity``,
  ``absence`` (the model finds nothing the phrase names);
- ``label_error_box``: the model's box, to compare with the annotation in the App;
- ``label_error_fold``: the fold whose model scored it (k-fold scoring);

and tags the samples at least ``suspect_thresh`` likely wrong ``suspect`` (the tag is first taken
off the view's other samples). The run is recorded on the dataset (``runs.py``: key
``label_errors_<field>``).

Honest predictions (``folds.py``): with a ``preset`` it trains ``folds`` models on image-disjoint
folds and each scores the fold it did not see; with a trained ``model`` it scores only the
samples outside its recorded training view and says how many it left out.

The signals (``signals.py``) are combined by a classifier fitted on a copy of the scored
annotations with errors injected (``inject.py``, ``combine.py``): no hand labels are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..data.fields import DEFAULT_LABEL, DEFAULT_PROMPT_FIELD
from ..data.labels import make_detections
from ..data.records import read_records
from ..devices import on_device, resolve_device
from ..errors import InputError
from ..fiftyone_api import root_dataset
from ..models.checkpoint import load_checkpoint
from ..runs import record_label_errors
from .combine import AMBIGUOUS, REPORTED_KIND, fit_error_model
from .folds import image_folds, train_fold_models, trained_rows
from .inject import KINDS, plan_corruptions, with_corrupted_copies
from .signals import Signals, compute_signals, scoring_progress

SUSPECT_TAG = "suspect"
SUSPECT_THRESH = 0.5  # more likely wrong than right
CALIBRATION_ROWS = 4000  # at most this many annotations get injected copies to fit the score on
MIN_COPIES = 400  # a small view gets several copies of each annotation, up to COPIES_PER_ROW
COPIES_PER_ROW = 10
# what a scoring writes (the review answer, <field>_reviewed, is a person's work: kept)
WRITTEN = ("", "_kind", "_driver", "_box", "_fold")
SIGNALS_SUFFIX = "_signals"  # each annotation's signals, between the score and calibrate steps
TRAINING_SHARE = 0.9  # of the progress reported while fold models train; the scoring takes the rest


@dataclass
class LabelErrorResult:
    """What :func:`compute_label_errors` did."""

    view: object  # the scored samples, the most likely errors first
    field: str
    scored: int
    suspects: int
    error_rate: float  # the view's estimated share of wrong annotations
    skipped: dict = field(default_factory=dict)  # reason -> count
    fitted_on: dict = field(default_factory=dict)  # class -> annotations the score was fitted on
    checkpoints: list = field(default_factory=list)

    def summary(self) -> str:
        skipped = "".join(f"; {n} skipped ({why})" for why, n in self.skipped.items())
        return (f"Scored {self.scored} annotations: about {self.error_rate:.1%} look wrong; {self.suspects} tagged "
                f"'{SUSPECT_TAG}' (P(wrong) >= {SUSPECT_THRESH}){skipped}. Sorted by `{self.field}`.")


def _load(model, device):
    """A ``GrounderBase``, its checkpoint folder (or zoo name) and the device to score on, from a
    ``GroundingModel`` (its own device, unless ``device`` is given) or a checkpoint path."""
    from ..inference.model import GroundingModel

    if isinstance(model, GroundingModel):
        if model.source is None:
            raise InputError("This GroundingModel does not say which checkpoint it came from, so the samples it "
                             "trained on cannot be left out: pass the checkpoint folder instead.")
        return model.model, model.source, resolve_device(device) if device else model.device
    return load_checkpoint(model), str(model), resolve_device(device)


def _count(skipped: dict, reason: str, n: int = 1) -> None:
    skipped[reason] = skipped.get(reason, 0) + n


def compute_label_errors(view, model=None, *, preset: Optional[str] = None, folds: int = 5,
                         train_options: Optional[dict] = None, out_dir=None,
                         phrase_field: str = DEFAULT_PROMPT_FIELD, gt_field: str = "ground_truth",
                         field: str = "label_error", suspect_thresh: float = SUSPECT_THRESH,
                         batch_size: int = 64, device=None, seed: int = 0, progress: bool = True,
                         progress_callback: Optional[Callable[[float, str], None]] = None,
                         say: Callable[[str], None] = print) -> LabelErrorResult:
    """Score every annotation of ``view`` (a phrase and its one box) with the probability that it
    is wrong; see the module's docstring for the fields written.

    ``model``: a trained checkpoint folder (or ``GroundingModel``): only the samples outside its
    recorded training view are scored. Else ``preset`` (with ``train_options``: ``fit``'s options,
    e.g. ``{"epochs": 10}``): ``folds`` models are trained on image-disjoint folds of the view, in
    ``out_dir`` (default ``runs/label_errors_<field>``), each scoring the fold it did not see.
    ``device``: where to score (default: a ``GroundingModel``'s own, else a GPU where there is one)."""
    if model is None and preset is None:
        raise InputError("Give model= (a trained checkpoint: scores the samples it did not train on) or preset= "
                         "(trains models on image-disjoint folds of the view, each scoring the fold it did not see).")
    if model is not None and preset is not None:
        raise InputError("Give model= or preset=, not both.")
    if model is None and (not isinstance(folds, int) or folds < 2):
        raise InputError(f"folds must be an integer >= 2, got {folds!r}")
    skipped: dict = {}
    records = _records(view, phrase_field, gt_field, skipped)

    if model is not None:
        network, source, device = _load(model, device)
        score_label_errors(view, network, source=source, phrase_field=phrase_field, gt_field=gt_field, field=field,
                           batch_size=batch_size, device=device, progress=progress,
                           progress_callback=progress_callback, say=say, records=records, skipped=skipped)
        return calibrate_label_errors(view, network, source=source, phrase_field=phrase_field, gt_field=gt_field,
                                      field=field, suspect_thresh=suspect_thresh, batch_size=batch_size,
                                      device=device, seed=seed, progress=progress,
                                      progress_callback=progress_callback, say=say, records=records,
                                      skipped=skipped)
    device = resolve_device(device)
    images = len(set(records.filepaths))
    if images < folds:
        raise InputError(f"{folds} folds need at least {folds} images; this view has {images}: lower folds, or "
                         f"score it with a trained model (model=...).")
    fold_of = image_folds(records.filepaths, folds, seed)
    options = {"seed": seed, **(train_options or {}), "preset": preset, "phrase_field": phrase_field,
               "gt_field": gt_field}
    out_dir = out_dir or str(Path("runs") / f"label_errors_{field}")
    training_progress = None if progress_callback is None else (
        lambda fraction, label: progress_callback(TRAINING_SHARE * fraction, label))
    with on_device(device):  # the fold runs train on the chosen GPU, not the current one
        checkpoints = [str(p) for p in train_fold_models(view, records, fold_of, out_dir, train_options=options,
                                                         say=say, progress=progress,
                                                         progress_callback=training_progress)]
    scored = np.arange(len(records))
    on_batch = scoring_progress(2 * len(scored), say if progress else None, progress_callback, start=TRAINING_SHARE)
    signals = _score(checkpoints, records, scored, fold_of, device, batch_size, on_batch, skipped, len(records))
    return _calibrate(view, records, scored, signals, fold_of, checkpoints, device=device, batch_size=batch_size,
                      field=field, phrase_field=phrase_field, gt_field=gt_field, suspect_thresh=suspect_thresh,
                      seed=seed, folds=folds, skipped=skipped, on_batch=on_batch, say=say)


def _records(view, phrase_field: str, gt_field: str, skipped: dict):
    records = read_records(view, phrase_field, gt_field)
    for _, reason in records.skipped:
        _count(skipped, reason)
    if len(records) == 0:
        raise InputError(f"No annotations to score in this view: each sample needs a phrase in {phrase_field!r} and "
                         f"one box in {gt_field!r}.")
    return records


def score_label_errors(view, model, *, source: Optional[str] = None, phrase_field: str = DEFAULT_PROMPT_FIELD,
                       gt_field: str = "ground_truth", field: str = "label_error", batch_size: int = 64,
                       device=None, distributed=False, progress: bool = True,
                       progress_callback: Optional[Callable[[float, str], None]] = None,
                       say: Callable[[str], None] = print, records=None, skipped: Optional[dict] = None) -> dict:
    """The first step of :func:`compute_label_errors` with a trained ``model``, which any number of
    processes or tasks can run on parts of a view: the signals of each annotation the model did
    not train on, written to ``<field>_signals`` with the model's box (``<field>_box``); the
    samples it must leave out get neither (an earlier scoring's values are cleared). The second
    step, :func:`calibrate_label_errors`, needs the whole view and runs once after.

    ``distributed``: under ``torchrun`` / ``accelerate launch``, this rank scores its share of the
    images (``inference/distributed.py``). Returns ``{"scored", "left_out", "skipped"}`` (this rank's).
    """
    from ..inference.distributed import shard_of

    shard = shard_of(distributed)
    network, source, device = _load(model, device) if source is None else (model, source, resolve_device(device))
    skipped = {} if skipped is None else skipped
    records = records if records is not None else _records(view, phrase_field, gt_field, skipped)
    mine = np.asarray([i for i, path in enumerate(records.filepaths) if shard.owns(path)], dtype=np.int64)
    left_out, run_key = trained_rows(view, source, records)
    if run_key is None and shard.rank == 0:
        say(f"No training run of {source} is recorded on this dataset: every sample is scored as one it did not "
            f"train on. If it did, its scores are too kind.")
    scored = np.setdiff1d(mine, left_out)
    if len(np.intersect1d(mine, left_out)):
        _count(skipped, f"trained on by {Path(source).name}, or an image it trained on",
               len(np.intersect1d(mine, left_out)))
    on_batch = scoring_progress(len(scored), say if progress else None, progress_callback)
    signals = _score([network], records, scored, np.zeros(len(records), dtype=np.int64), device, batch_size,
                     on_batch, skipped, len(records))
    dataset = root_dataset(view)
    ids = [records.sample_ids[i] for i in mine]
    readable = set(scored[np.isfinite(signals["iou"][scored])].tolist())
    stored = {records.sample_ids[i]: _stored_signals(signals, i) if i in readable else None for i in mine}
    dataset.set_values(field + SIGNALS_SUFFIX, stored, key_field="id")
    rows = [i for i in mine if i in readable]
    _write_boxes(dataset, records, rows, signals.take(rows), field, clear=ids)
    return {"scored": len(readable), "left_out": len(mine) - len(scored), "skipped": skipped}


def _stored_signals(signals: Signals, i: int) -> dict:
    """One annotation's signals as stored between the two steps (JSON numbers; NaN as None)."""
    values = {name: (None if math.isnan(v[i]) else float(v[i])) for name, v in signals.values.items()}
    return {**values, "box": [float(x) for x in signals.boxes[i]]}


def calibrate_label_errors(view, model, *, source: Optional[str] = None, phrase_field: str = DEFAULT_PROMPT_FIELD,
                           gt_field: str = "ground_truth", field: str = "label_error",
                           suspect_thresh: float = SUSPECT_THRESH, batch_size: int = 64, device=None, seed: int = 0,
                           progress: bool = True, progress_callback: Optional[Callable[[float, str], None]] = None,
                           say: Callable[[str], None] = print, records=None,
                           skipped: Optional[dict] = None) -> LabelErrorResult:
    """The second step of :func:`compute_label_errors` with a trained ``model``, once for the whole
    view after :func:`score_label_errors` has run on all of it (in any number of parts): errors
    injected into copies of at most ``CALIBRATION_ROWS`` scored annotations, scored by ``model``;
    the classifier fitted on them; each annotation's P(wrong), kind and driver written; the
    suspects tagged; the run recorded."""
    network, source, device = _load(model, device) if source is None else (model, source, resolve_device(device))
    standalone = skipped is None  # else the score step of this process counted what it left out
    skipped = {} if skipped is None else skipped
    records = records if records is not None else _records(view, phrase_field, gt_field, skipped)
    if not view.has_field(field + SIGNALS_SUFFIX):
        raise InputError(f"No annotation of this view has been scored into {field + SIGNALS_SUFFIX!r}: run "
                         f"score_label_errors (the 'score' step) on it first.")
    stored = dict(zip(*view.values(["id", field + SIGNALS_SUFFIX])))
    n = len(records)
    signals = Signals(np.full((n, 4), np.nan), {})
    scored = []
    for i, sid in enumerate(records.sample_ids):
        values = stored.get(sid)
        if not values:
            continue
        scored.append(i)
        signals.boxes[i] = values["box"]
        for name, value in values.items():
            if name != "box":
                signals.values.setdefault(name, np.full(n, np.nan))[i] = np.nan if value is None else value
    scored = np.asarray(scored, dtype=np.int64)
    if len(scored) == 0:
        raise InputError("Every sample of this view is one the model trained on (or shares an image with one): "
                         "score a view it did not train on (e.g. the val or test split), or pass preset= to "
                         "train fold models.")
    if len(scored) < n and standalone:
        _count(skipped, "not scored (trained on, unreadable, or not run by the score step)", n - len(scored))
    fold_of = np.full(n, -1, dtype=np.int64)
    fold_of[scored] = 0
    on_batch = scoring_progress(min(len(scored), CALIBRATION_ROWS) * COPIES_PER_ROW, say if progress else None,
                                progress_callback)
    return _calibrate(view, records, scored, signals, fold_of, [network], checkpoints=[source], device=device,
                      batch_size=batch_size, field=field, phrase_field=phrase_field, gt_field=gt_field,
                      suspect_thresh=suspect_thresh, seed=seed, folds=None, skipped=skipped, on_batch=on_batch,
                      say=say)


def _calibrate(view, records, scored: np.ndarray, signals: Signals, fold_of: np.ndarray, networks: list,
               checkpoints: Optional[list] = None, *, device, batch_size: int, field: str, phrase_field: str,
               gt_field: str, suspect_thresh: float, seed: int, folds: Optional[int], skipped: dict, on_batch,
               say) -> LabelErrorResult:
    """Inject errors into copies of some scored annotations, score the copies with the network of
    their annotation's fold, fit the classifier, write every scored annotation's P(wrong)."""
    checkpoints = checkpoints or [str(n) for n in networks]
    dataset = root_dataset(view)
    if len(scored) == 0:
        raise InputError("Every sample of this view is one the model trained on (or shares an image with one): "
                         "score a view it did not train on (e.g. the val or test split), or pass preset= to "
                         "train fold models.")
    rng = np.random.default_rng([seed, 26])
    calib_rows = np.sort(rng.choice(scored, size=min(len(scored), CALIBRATION_ROWS), replace=False))
    copies = min(COPIES_PER_ROW, -(-MIN_COPIES // len(calib_rows)))  # a small view: several copies each
    corruptions = [c for _ in range(copies) for c in plan_corruptions(records, calib_rows, rng)]
    both, labels = with_corrupted_copies(records, corruptions)
    copy_fold = np.concatenate([fold_of, fold_of[[c.index for c in corruptions]]])
    copy_rows = len(records) + np.arange(len(corruptions))
    copied = _score(networks, both, copy_rows, copy_fold, device, batch_size, on_batch, {}, len(records))
    signals = Signals(np.concatenate([signals.boxes, copied.boxes[len(records):]]),
                      {name: np.concatenate([signals.values.get(name, np.full(len(records), np.nan)),
                                             copied.values[name][len(records):]]) for name in copied.values})

    readable = scored[np.isfinite(signals["iou"][scored])]
    if len(readable) == 0:
        raise InputError(f"No image of this view could be read: {skipped}")
    fit_rows = np.concatenate([calib_rows, copy_rows])
    fit_rows = fit_rows[np.isfinite(signals["iou"][fit_rows])]
    error_model = fit_error_model(signals.take(fit_rows), [labels[i] for i in fit_rows], KINDS, seed=seed)
    # each scored annotation by the half of the score's classifier that was not fitted on it
    half_of = dict(zip(fit_rows.tolist(), error_model.fitted_half.tolist()))
    halves = np.asarray([half_of.get(int(i), -1) for i in readable])
    mine = signals.take(readable)
    wrong = error_model.probability(mine, halves)
    drivers = error_model.drivers(mine)
    reported = [AMBIGUOUS if d == "ambiguity" else REPORTED_KIND[k]
                for k, d in zip(error_model.kind(mine, halves), drivers)]
    suspects = _write(dataset, view, records, readable, mine, wrong, reported, drivers, fold_of, field,
                      suspect_thresh, with_folds=folds is not None)
    record_label_errors(view, field, gt_field=gt_field, phrase_field=phrase_field, checkpoints=checkpoints,
                        folds=folds, error_rate=error_model.error_rate,
                        scored=len(readable), suspects=suspects,
                        fitted_on={k: int(v) for k, v in error_model.fitted_on.items()})
    result = LabelErrorResult(view=view.sort_by(field, reverse=True), field=field, scored=len(readable),
                              suspects=suspects, error_rate=error_model.error_rate, skipped=skipped,
                              fitted_on=dict(error_model.fitted_on), checkpoints=checkpoints)
    say(result.summary())
    return result


def _score(networks: list, both, rows_needed: np.ndarray, copy_fold: np.ndarray, device, batch_size: int,
           on_batch, skipped: dict, originals: int) -> Signals:
    """The signals of ``rows_needed`` of ``both``, each row under its fold's network (loaded one at
    a time); the unreadable annotations are counted in ``skipped`` (their copies share their image)."""
    from ..models.precision import AUTOCAST_DTYPES, default_mixed_precision

    autocast_dtype = AUTOCAST_DTYPES[default_mixed_precision(device)]
    n = len(both.phrases)
    signals = Signals(np.full((n, 4), np.nan), {})
    for k, network in enumerate(networks):
        rows = rows_needed[copy_fold[rows_needed] == k]
        network = load_checkpoint(network) if isinstance(network, str) else network
        part = compute_signals(network, both.take(rows), device=device, batch_size=batch_size,
                               autocast_dtype=autocast_dtype, on_batch=on_batch)
        signals.boxes[rows] = part.boxes
        for name, values in part.values.items():
            signals.values.setdefault(name, np.full(n, np.nan))[rows] = values
        for row, reason in part.skipped:
            if rows[row] < originals:
                _count(skipped, reason)
    return signals


def _write(dataset, view, records, rows, signals: Signals, wrong, kinds, drivers, fold_of, field: str,
           suspect_thresh: float, with_folds: bool) -> int:
    """Clear what an earlier scoring wrote on the view, write the scores, kinds, drivers and model
    boxes in bulk, and tag the suspects."""
    for suffix in WRITTEN:
        if view.has_field(field + suffix):
            view.clear_sample_field(field + suffix)
    ids = [records.sample_ids[i] for i in rows]
    dataset.set_values(field, dict(zip(ids, map(float, wrong))), key_field="id")
    dataset.set_values(f"{field}_kind", dict(zip(ids, kinds)), key_field="id")
    dataset.set_values(f"{field}_driver", dict(zip(ids, drivers)), key_field="id")
    _write_boxes(dataset, records, rows, signals, field)
    if with_folds:
        dataset.set_values(f"{field}_fold", {sid: int(fold_of[i]) for sid, i in zip(ids, rows)}, key_field="id")
    view.untag_samples(SUSPECT_TAG)
    flagged = [sid for sid, p in zip(ids, wrong) if p >= suspect_thresh]
    if flagged:
        dataset.select(flagged).tag_samples(SUSPECT_TAG)
    return len(flagged)


def _write_boxes(dataset, records, rows, signals: Signals, field: str, clear=()) -> None:
    """The model's box of each of ``rows`` (``signals`` in their order) to ``<field>_box``, with
    its confidence; the samples ``clear`` names that are not among them get none."""
    conf = signals["confidence"]
    boxes = {sid: None for sid in clear}
    boxes.update({records.sample_ids[i]: make_detections(list(box), records.phrases[i], label=DEFAULT_LABEL,
                                                         confidence=None if math.isnan(c) else float(c))
                  for i, box, c in zip(rows, signals.boxes, conf)})
    if boxes:
        dataset.set_values(f"{field}_box", boxes, key_field="id")
