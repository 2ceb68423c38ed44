"""Finding a typed phrase: across a dataset, and in the sample the App shows.

- :func:`search_phrase` grounds one phrase in every image of a view (each image encoded once,
  from the feature cache where training left one for this model), writes the boxes with their
  confidence, and returns the view sorted by confidence, most likely first. FiftyOne's
  Similarity Search ranks whole images or patches; this ranks images by where a phrase is.
- :func:`ground_in_sample`, :func:`keep_box`, :func:`clear_box`: the grounding panel's work on
  the current sample (a preview box with its confidence and its IoU with the ground truth; keep
  it in a field; clear it).

Boxes are post-processed (``postprocess.py``) and written by ``apply.ground_phrase``
(``LabelMaker`` / ``LabelWriter``), the path every apply takes, so a model that finds zero or
several boxes per phrase writes them here too; the ranking and the panel take each image's most
confident box (``postprocess.most_confident`` on one sample).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .apply import declare_detections_field, ground_phrase
from ..models.boxes import box_iou
from ..data.cache import default_feature_cache_dir, find_feature_cache
from ..data.fields import GROUNDED_FIELD, PREVIEW_FIELD, SEARCH_FIELD
from ..errors import InputError
from .model import GroundingModel
from .postprocess import most_confident
from ..data.labels import EXPRESSION_ATTR, detection_xyxy
from ..runs import record_labels
from ..fiftyone_api import root_dataset


def search_phrase(view, phrase: str, model: GroundingModel, label_field: str = SEARCH_FIELD,
                  batch_size: Optional[int] = None, confidence_thresh: Optional[float] = None,
                  use_cache: bool = True, cache_dir=None, progress: Optional[bool] = None,
                  progress_callback: Optional[Callable[[float, str], None]] = None, distributed=False):
    """Where ``phrase`` is in every image of ``view``, images ranked by how sure the model is.

    Writes each sample's box, with its confidence and the phrase, to ``label_field`` (a
    ``Detections`` field; an unreadable image gets none) and returns ``view`` sorted by the
    confidence, most likely first (samples without a box last; the samples of one image are
    next to each other). Each image is encoded once, and its phrase once per batch. With
    ``use_cache``, images whose frozen features training cached for this model (under
    ``cache_dir``, default that of ``fit``) are read from the cache instead of being decoded
    and encoded; the adapter architecture reads the phrase inside the image encoder and always
    encodes. ``confidence_thresh`` drops the less confident boxes. ``distributed``: under
    ``torchrun`` / ``accelerate launch``, this rank grounds its share of the images only
    (``apply.apply_grounding_model``); the ranking is a view of the whole, ready once every rank
    has written (each rank returns when all are done).
    """
    if not model.model.has_confidence:
        raise InputError("This model has no confidence (it was trained without a quality head), so it cannot rank "
                         "images by a phrase: use ground_phrase, or a model trained with this version.")
    features = None
    if use_cache:
        features = find_feature_cache(Path(cache_dir) if cache_dir else default_feature_cache_dir(), model.model)
    ground_phrase(view, phrase, model, label_field=label_field, batch_size=batch_size, progress=progress,
                  progress_callback=progress_callback, confidence_thresh=confidence_thresh, features=features,
                  distributed=distributed)
    return rank_by_confidence(view, label_field)


def rank_by_confidence(view, label_field: str):
    """``view`` sorted by the most confident box of ``label_field``, most confident first."""
    from fiftyone import ViewField as F

    return view.sort_by(F(f"{label_field}.detections.confidence").max(), reverse=True)


# -- the grounding panel: one sample ------------------------------------------------------------


def ground_in_sample(samples, sample_id: str, phrase: str, model: GroundingModel,
                     preview_field: str = PREVIEW_FIELD, gt_field: Optional[str] = None) -> dict:
    """Ground ``phrase`` in the sample ``sample_id`` of ``samples``, write the box to
    ``preview_field`` (not recorded as a result: :func:`keep_box` keeps it) and return
    ``{"phrase", "confidence", "iou", "boxes"}``: the most confident box's confidence and its IoU
    with the first box of ``gt_field`` (None where the sample has none), and the number of boxes."""
    sample = samples.select(sample_id)
    if len(sample) == 0:
        raise InputError(f"No sample {sample_id!r} here: open a sample of this dataset.")
    # no progress bar: a shown one captures sys.stdout, which is not safe in the App server's
    # threads, where the panel's events (one per typing pause) can run at once
    ground_phrase(sample, phrase, model, label_field=preview_field, batch_size=1, record=False, progress=False)
    fields = [f"{preview_field}.detections.bounding_box", f"{preview_field}.detections.confidence"]
    has_truth = bool(gt_field) and samples.has_field(gt_field)
    if has_truth:
        fields.append(f"{gt_field}.detections.bounding_box")
    values = sample.values(fields)
    boxes, confidences = values[0][0] or [], values[1][0] or []
    if not boxes:
        return {"phrase": phrase, "confidence": None, "iou": None, "boxes": 0}
    best = most_confident(confidences)
    truth = values[2][0] if has_truth else None
    iou = None
    if truth:
        iou = float(box_iou(np.asarray(detection_xyxy(boxes[best])), np.asarray(detection_xyxy(truth[0]))))
    return {"phrase": phrase, "confidence": confidences[best], "iou": iou, "boxes": len(boxes)}


def keep_box(samples, sample_id: str, model_source: Optional[str], preview_field: str = PREVIEW_FIELD,
             keep_field: str = GROUNDED_FIELD) -> int:
    """Move the preview boxes of the sample ``sample_id`` into ``keep_field`` (beside the boxes of
    other phrases kept there; a box of the same phrase is replaced) and record which model wrote
    them. Returns how many boxes ``keep_field`` holds on the sample."""
    import fiftyone as fo

    dataset = root_dataset(samples)
    sample = dataset[sample_id]
    preview = sample[preview_field] if dataset.has_field(preview_field) else None
    if preview is None or not preview.detections:
        raise InputError("There is no box to keep on this sample: type a phrase first.")
    declare_detections_field(dataset, keep_field)
    phrases = {getattr(det, EXPRESSION_ATTR, None) for det in preview.detections}
    kept = [det for det in (sample[keep_field].detections if sample[keep_field] is not None else [])
            if getattr(det, EXPRESSION_ATTR, None) not in phrases]
    sample[keep_field] = fo.Detections(detections=kept + [det.copy() for det in preview.detections])
    sample[preview_field] = None
    sample.save()
    record_labels(dataset, keep_field, model_source, phrase=", ".join(sorted(p for p in phrases if p)),
                  kept_from=preview_field)
    return len(sample[keep_field].detections)


def clear_box(samples, sample_id: str, preview_field: str = PREVIEW_FIELD) -> None:
    """Remove the preview box of the sample ``sample_id``."""
    dataset = root_dataset(samples)
    if dataset.has_field(preview_field):
        dataset.set_values(preview_field, {sample_id: None}, key_field="id")
