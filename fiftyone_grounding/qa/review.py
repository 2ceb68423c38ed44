"""Reviewing the flags of ``compute_label_errors``: the two answers a reviewer gives and how many
flags turned out right.

- :func:`mark_right`: the annotation is right: ``label_error_reviewed = "ok"``;
- :func:`use_model_box`: the model's box replaces the annotated one (the old box stays on the new
  detection as its ``previous_bounding_box`` attribute): ``label_error_reviewed = "fixed"``;
- :func:`review_precision`: of the reviewed ``suspect`` samples, the share that were wrong.

The fields are plain FiftyOne fields: a box edited by hand in the App's annotation mode or through
``annotate()`` is a ``Detections`` edit like any other, and a reviewer may set
``label_error_reviewed`` there too.
"""

from __future__ import annotations

from typing import Optional

from ..errors import InputError
from ..fiftyone_api import root_dataset
from .label_errors import SUSPECT_TAG

REVIEWED = "reviewed"  # suffix of the review field: label_error_reviewed
OK, FIXED = "ok", "fixed"


def _sample(samples, sample_id: str):
    """The dataset's sample ``sample_id`` (written there: a view's sample may not add fields), if
    ``samples`` holds it."""
    try:
        samples[sample_id]
    except (KeyError, ValueError):
        raise InputError(f"No sample {sample_id!r} here (deleted, or outside this view)") from None
    return root_dataset(samples)[sample_id]


def mark_right(samples, sample_id: str, field: str = "label_error") -> None:
    """Record that the annotation of ``sample_id`` is right."""
    sample = _sample(samples, sample_id)
    sample[f"{field}_{REVIEWED}"] = OK
    sample.save()


def use_model_box(samples, sample_id: str, gt_field: str = "ground_truth", field: str = "label_error") -> list:
    """Replace the annotated box of ``sample_id`` with the model's (``<field>_box``), keeping the
    old box as the new detection's ``previous_bounding_box``; returns the new box (FiftyOne's
    relative ``[x, y, w, h]``). Used again, it keeps the annotator's box, not the model's."""
    sample = _sample(samples, sample_id)
    model = sample[f"{field}_box"] if sample.has_field(f"{field}_box") else None
    if model is None or not model.detections:
        raise InputError(f"This sample has no model box in `{field}_box`: run Find label errors on it first")
    truth = sample[gt_field] if sample.has_field(gt_field) else None
    if truth is None or len(truth.detections) != 1:
        raise InputError(f"`{gt_field}` of this sample holds {0 if truth is None else len(truth.detections)} boxes; "
                         "use the model's box on annotations of one box")
    detection = truth.detections[0]
    if not (detection.has_field("previous_bounding_box") and detection["previous_bounding_box"]):
        detection["previous_bounding_box"] = list(detection.bounding_box)  # the annotator's box, kept once
    detection.bounding_box = list(model.detections[0].bounding_box)
    sample[f"{field}_{REVIEWED}"] = FIXED
    sample.save()
    return list(detection.bounding_box)


def review_precision(samples, field: str = "label_error") -> dict:
    """Of the ``suspect`` samples of ``samples`` a reviewer answered: how many were wrong
    (``fixed``) and the share (None before any review)."""
    from fiftyone import ViewField as F

    name = f"{field}_{REVIEWED}"
    if not samples.has_field(name):
        return {"reviewed": 0, "fixed": 0, "ok": 0, "precision": None}
    flagged = samples.match_tags(SUSPECT_TAG).match(F(name).is_in([OK, FIXED]))
    counts = flagged.count_values(name)
    fixed, ok = counts.get(FIXED, 0), counts.get(OK, 0)
    reviewed = fixed + ok
    return {"reviewed": reviewed, "fixed": fixed, "ok": ok, "precision": fixed / reviewed if reviewed else None}


def review_line(stats: dict) -> Optional[str]:
    """One line for the panel: "3 of 4 reviewed flags were wrong annotations (precision 0.75)"."""
    if not stats["reviewed"]:
        return None
    return (f"{stats['fixed']} of {stats['reviewed']} reviewed flags were wrong annotations "
            f"(precision {stats['precision']:.2f})")
