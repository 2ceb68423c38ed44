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

import fiftyone.core.utils as fou
import numpy as np

from ..data.fields import DEFAULT_LABEL, DEFAULT_PROMPT_FIELD
from ..data.labels import make_detections
from ..data.records import read_records, require_fields
from ..devices import on_device, resolve_device
from ..errors import InputError
from ..fiftyone_api import root_dataset, stream_by_filepath
from ..inference.apply import ROWS_PER_CHUNK, chunks_of_whole_images
from ..models.checkpoint import load_checkpoint
from ..runs import record_label_errors
from .combine import AMBIGUOUS, REPORTED_KIND, fit_error_model
from .folds import TrainedImages, image_folds, train_fold_models
from .inject import KINDS, plan_corruptions, with_corrupted_copies
from .signals import Signals, compute_signals, scoring_progress

SUSPECT_TAG = "suspect"
SUSPECT_THRESH = 0.5  # more likely wrong than right
CALIBRATION_ROWS = 4000  # at most this many annotations get injected copies to fit the score on
MIN_COPIES = 400  # a small view gets several copies of each annotation, up to COPIES_PER_ROW
COPIES_PER_ROW = 10
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
    options = dict(phrase_field=phrase_field, gt_field=gt_field, field=field, batch_size=batch_size, say=say)
    if model is not None:
        network, source, device = _load(model, device)
        score_label_errors(view, network, source=source, device=device, progress=progress,
                           progress_callback=progress_callback, skipped=skipped, **options)
        return calibrate_label_errors(view, network, source=source, suspect_thresh=suspect_thresh, device=device,
                                      seed=seed, progress=progress, progress_callback=progress_callback,
                                      skipped=skipped, **options)
    records = _records(view, phrase_field, gt_field, skipped)
    device = resolve_device(device)
    images = len(set(records.filepaths))
    if images < folds:
        raise InputError(f"{folds} folds need at least {folds} images; this view has {images}: lower folds, or "
                         f"score it with a trained model (model=...).")
    fold_of = image_folds(records.filepaths, folds, seed)
    train = {"seed": seed, **(train_options or {}), "preset": preset, "phrase_field": phrase_field,
             "gt_field": gt_field}
    out_dir = out_dir or str(Path("runs") / f"label_errors_{field}")
    training_progress = None if progress_callback is None else (
        lambda fraction, label: progress_callback(TRAINING_SHARE * fraction, label))
    with on_device(device):  # the fold runs train on the chosen GPU, not the current one
        checkpoints = [str(p) for p in train_fold_models(view, records, fold_of, out_dir, train_options=train,
                                                         say=say, progress=progress,
                                                         progress_callback=training_progress)]
    scored = np.arange(len(records))
    on_batch = scoring_progress(2 * len(scored), say if progress else None, progress_callback, start=TRAINING_SHARE)
    signals = _score(checkpoints, records, scored, fold_of, device, batch_size, on_batch, skipped, len(records))
    readable = scored[np.isfinite(signals["iou"][scored])]
    _store(root_dataset(view), records, readable, signals, field, clear=view.values("id"), fold_of=fold_of)
    return _calibrate(view, checkpoints, checkpoints, device=device, seed=seed, folds=folds,
                      suspect_thresh=suspect_thresh, skipped=skipped, on_batch=on_batch, **options)


def _records(view, phrase_field: str, gt_field: str, skipped: dict):
    records = read_records(view, phrase_field, gt_field)
    for _, reason in records.skipped:
        _count(skipped, reason)
    if len(records) == 0:
        raise _no_annotations(phrase_field, gt_field)
    return records


def _no_annotations(phrase_field: str, gt_field: str) -> InputError:
    return InputError(f"No annotations to score in this view: each sample needs a phrase in {phrase_field!r} and "
                      f"one box in {gt_field!r}.")


def _image_chunks(view, shard, rows: int = ROWS_PER_CHUNK):
    """The sample ids of ``view``'s images that ``shard`` runs, a chunk of about ``rows`` samples
    (whole images) at a time, read in pages: memory holds a chunk, not the view."""
    mine = (row for row in stream_by_filepath(view) if shard.owns(row[1]))
    for chunk in chunks_of_whole_images(mine, rows):
        yield [sid for sid, _ in chunk]


def score_label_errors(view, model, *, source: Optional[str] = None, phrase_field: str = DEFAULT_PROMPT_FIELD,
                       gt_field: str = "ground_truth", field: str = "label_error", batch_size: int = 64,
                       device=None, distributed=False, progress: bool = True,
                       progress_callback: Optional[Callable[[float, str], None]] = None,
                       say: Callable[[str], None] = print, skipped: Optional[dict] = None) -> dict:
    """The first step of :func:`compute_label_errors` with a trained ``model``, which any number of
    processes or tasks can run on parts of a view: the signals of each annotation the model did
    not train on, written to ``<field>_signals`` with the model's box (``<field>_box``); the
    samples it must leave out get neither (an earlier scoring's values are cleared). The view is
    read, scored and written a chunk of images at a time (``ROWS_PER_CHUNK`` samples), so memory
    does not grow with it. The second step, :func:`calibrate_label_errors`, runs once after.

    ``distributed``: under ``torchrun`` / ``accelerate launch``, this rank scores its share of the
    images (``inference/distributed.py``). Returns ``{"scored", "left_out", "skipped"}`` (this rank's).
    """
    from ..inference.distributed import shard_of

    shard = shard_of(distributed)
    network, source, device = _load(model, device) if source is None else (model, source, resolve_device(device))
    skipped = {} if skipped is None else skipped
    require_fields(view, (phrase_field, gt_field))
    trained = TrainedImages(view, source)
    if trained.key is None and shard.rank == 0:
        say(f"No training run of {source} is recorded on this dataset: every sample is scored as one it did not "
            f"train on. If it did, its scores are too kind.")
    total = sum(1 for row in stream_by_filepath(view) if shard.owns(row[1]))
    on_batch = scoring_progress(total, say if progress else None, progress_callback)
    dataset = root_dataset(view)
    counts = {"annotations": 0, "scored": 0, "left_out": 0}
    for ids in _image_chunks(view, shard):
        records = read_records(view.select(ids), phrase_field, gt_field)
        for _, reason in records.skipped:
            _count(skipped, reason)
        left_out = trained.rows(records)
        if len(left_out):
            _count(skipped, f"trained on by {Path(source).name}, or an image it trained on", len(left_out))
        scored = np.setdiff1d(np.arange(len(records)), left_out)
        signals = _score([network], records, scored, np.zeros(len(records), dtype=np.int64), device, batch_size,
                         on_batch, skipped, len(records))
        readable = scored[np.isfinite(signals["iou"][scored])]
        _store(dataset, records, readable, signals, field, clear=ids)
        counts["annotations"] += len(records)
        counts["scored"] += len(readable)
        counts["left_out"] += len(left_out)
    if counts["annotations"] == 0 and not shard.distributed:
        raise _no_annotations(phrase_field, gt_field)
    return {"scored": counts["scored"], "left_out": counts["left_out"], "skipped": skipped}


def _store(dataset, records, rows, signals: Signals, field: str, clear=(), fold_of=None) -> None:
    """Each of ``rows``' signals to ``<field>_signals`` and the model's box to ``<field>_box`` (and
    its fold to ``<field>_fold``); the samples ``clear`` names that are not among them get none."""
    stored = {sid: None for sid in clear}
    stored.update({records.sample_ids[i]: _stored_signals(signals, i) for i in rows})
    if stored:
        dataset.set_values(field + SIGNALS_SUFFIX, stored, key_field="id")
    _write_boxes(dataset, records, rows, signals.take(rows), field, clear=clear)
    if fold_of is not None:
        folds = {sid: None for sid in clear}
        folds.update({records.sample_ids[i]: int(fold_of[i]) for i in rows})
        dataset.set_values(f"{field}_fold", folds, key_field="id")


def _stored_signals(signals: Signals, i: int) -> dict:
    """One annotation's signals as stored between the two steps (JSON numbers; NaN as None)."""
    values = {name: (None if math.isnan(v[i]) else float(v[i])) for name, v in signals.values.items()}
    return {**values, "box": [float(x) for x in signals.boxes[i]]}


def _signals_of(stored: list) -> Signals:
    """Stored signals (dicts, as :func:`_stored_signals` writes them) back as ``Signals``."""
    n = len(stored)
    signals = Signals(np.asarray([d["box"] for d in stored], dtype=np.float64).reshape(n, 4), {})
    for i, values in enumerate(stored):
        for name, value in values.items():
            if name != "box":
                signals.values.setdefault(name, np.full(n, np.nan))[i] = np.nan if value is None else value
    return signals


def calibrate_label_errors(view, model, *, source: Optional[str] = None, phrase_field: str = DEFAULT_PROMPT_FIELD,
                           gt_field: str = "ground_truth", field: str = "label_error",
                           suspect_thresh: float = SUSPECT_THRESH, batch_size: int = 64, device=None, seed: int = 0,
                           progress: bool = True, progress_callback: Optional[Callable[[float, str], None]] = None,
                           say: Callable[[str], None] = print, skipped: Optional[dict] = None) -> LabelErrorResult:
    """The second step of :func:`compute_label_errors` with a trained ``model``, once for the whole
    view after :func:`score_label_errors` has run on all of it (in any number of parts): errors
    injected into copies of at most ``CALIBRATION_ROWS`` scored annotations, scored by ``model``;
    the classifier fitted on them; each annotation's P(wrong), kind and driver written a page at
    a time; the suspects tagged; the run recorded."""
    network, source, device = _load(model, device) if source is None else (model, source, resolve_device(device))
    standalone = skipped is None  # else the score step of this process counted what it left out
    skipped = {} if skipped is None else skipped
    on_batch = scoring_progress(CALIBRATION_ROWS, say if progress else None, progress_callback)
    return _calibrate(view, [network], [source], phrase_field=phrase_field, gt_field=gt_field, field=field,
                      suspect_thresh=suspect_thresh, batch_size=batch_size, device=device, seed=seed, folds=None,
                      skipped=skipped, on_batch=on_batch, say=say, count_unscored=standalone)


def _calibrate(view, networks: list, checkpoints: list, *, phrase_field: str, gt_field: str, field: str,
               suspect_thresh: float, batch_size: int, device, seed: int, folds: Optional[int], skipped: dict,
               on_batch, say, count_unscored: bool = False) -> LabelErrorResult:
    """From the signals stored on ``view``: inject errors into copies of at most
    ``CALIBRATION_ROWS`` scored annotations (the pool they draw other objects and phrases from:
    every annotation of those annotations' images), score the copies with the network of their
    annotation's fold (``<field>_fold``; one network: all), fit the classifier, and write every
    scored annotation's P(wrong), a page at a time."""
    signals_field = field + SIGNALS_SUFFIX
    if not view.has_field(signals_field):
        raise InputError(f"No annotation of this view has been scored into {signals_field!r}: run "
                         f"score_label_errors (the 'score' step) on it first.")
    scored_view = view.exists(signals_field)
    scored_ids = scored_view.values("id")  # the natural order: which annotations get copies
    if not scored_ids:
        raise InputError("Every sample of this view is one the model trained on (or shares an image with one): "
                         "score a view it did not train on (e.g. the val or test split), or pass preset= to "
                         "train fold models.")
    if count_unscored and len(scored_ids) < len(view):
        _count(skipped, "not scored (trained on, unreadable, or not run by the score step)",
               len(view) - len(scored_ids))
    rng = np.random.default_rng([seed, 26])
    chosen = set(scored_ids[i] for i in rng.choice(len(scored_ids), size=min(len(scored_ids), CALIBRATION_ROWS),
                                                   replace=False))
    del scored_ids
    # every annotation of the chosen annotations' images: what the injected errors are drawn from
    chosen_paths = sorted(set(view.select(list(chosen)).values("filepath")))
    pool = read_records(view.match({"filepath": {"$in": chosen_paths}}), phrase_field, gt_field)
    read = [signals_field] + ([f"{field}_fold"] if folds is not None else [])  # one network: every fold is 0
    ids, stored, *fold = view.select(pool.sample_ids).values(["id", *read])
    stored, fold_by_id = dict(zip(ids, stored)), dict(zip(ids, fold[0])) if fold else {}
    calib_rows = np.asarray([i for i, sid in enumerate(pool.sample_ids) if sid in chosen and stored.get(sid)],
                            dtype=np.int64)
    fold_of = np.asarray([fold_by_id.get(sid) or 0 for sid in pool.sample_ids], dtype=np.int64)
    copies = min(COPIES_PER_ROW, -(-MIN_COPIES // len(calib_rows)))  # a small view: several copies each
    corruptions = [c for _ in range(copies) for c in plan_corruptions(pool, calib_rows, rng)]
    both, labels = with_corrupted_copies(pool, corruptions)
    copy_fold = np.concatenate([fold_of, fold_of[[c.index for c in corruptions]]])
    copy_rows = len(pool) + np.arange(len(corruptions))
    copied = _score(networks, both, copy_rows, copy_fold, device, batch_size, on_batch, {}, len(pool))
    originals = _signals_of([stored[pool.sample_ids[i]] for i in calib_rows])
    fit_signals = Signals(np.concatenate([originals.boxes, copied.boxes[copy_rows]]),
                          {name: np.concatenate([originals.values.get(name, np.full(len(calib_rows), np.nan)),
                                                 copied.values[name][copy_rows]]) for name in copied.values})
    fit_labels = [""] * len(calib_rows) + [labels[i] for i in copy_rows]
    keep = np.isfinite(fit_signals["iou"])
    fit_ids = [pool.sample_ids[i] for i in calib_rows] + [None] * len(copy_rows)
    error_model = fit_error_model(fit_signals.take(np.flatnonzero(keep)), [fit_labels[i] for i in np.flatnonzero(keep)],
                                  KINDS, seed=seed)
    # each scored annotation by the half of the score's classifier that was not fitted on it
    half_of = {fit_ids[i]: int(h) for i, h in zip(np.flatnonzero(keep), error_model.fitted_half) if fit_ids[i]}
    dataset = root_dataset(view)
    for suffix in ("", "_kind", "_driver"):
        if view.has_field(field + suffix):
            view.clear_sample_field(field + suffix)
    view.untag_samples(SUSPECT_TAG)
    scored = suspects = 0
    for page in fou.iter_batches(stream_by_filepath(scored_view, (signals_field,)), ROWS_PER_CHUNK):
        ids = [sid for sid, _, _ in page]
        mine = _signals_of([values for _, _, values in page])
        halves = np.asarray([half_of.get(sid, -1) for sid in ids])
        wrong = error_model.probability(mine, halves)
        drivers = error_model.drivers(mine)
        reported = [AMBIGUOUS if d == "ambiguity" else REPORTED_KIND[k]
                    for k, d in zip(error_model.kind(mine, halves), drivers)]
        dataset.set_values(field, dict(zip(ids, map(float, wrong))), key_field="id")
        dataset.set_values(f"{field}_kind", dict(zip(ids, reported)), key_field="id")
        dataset.set_values(f"{field}_driver", dict(zip(ids, drivers)), key_field="id")
        flagged = [sid for sid, p in zip(ids, wrong) if p >= suspect_thresh]
        if flagged:
            dataset.select(flagged).tag_samples(SUSPECT_TAG)
        scored += len(ids)
        suspects += len(flagged)
    record_label_errors(view, field, gt_field=gt_field, phrase_field=phrase_field, checkpoints=checkpoints,
                        folds=folds, error_rate=error_model.error_rate, scored=scored, suspects=suspects,
                        fitted_on={k: int(v) for k, v in error_model.fitted_on.items()})
    result = LabelErrorResult(view=view.sort_by(field, reverse=True), field=field, scored=scored,
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
