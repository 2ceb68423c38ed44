"""The one place where grounding boxes become FiftyOne labels and back.

Label scheme: every ground-truth and predicted ``Detection`` carries the referring
expression as its ``label``. FiftyOne's ``evaluate_detections`` only counts a match
when labels are equal (even with ``classwise=False``), so ground truth and
predictions must share one scheme; the expression also shows on the box in the App.
"""

from __future__ import annotations

from typing import Optional, Sequence

import fiftyone as fo
from bson import ObjectId

from .boxes import fiftyone_xywh_to_xyxy, xyxy_to_fiftyone_xywh

MAX_LABEL_CHARS = 200


def label_for(expression: str) -> str:
    """The ``label`` that ground truth and predictions of ``expression`` share."""
    text = " ".join(str(expression).split())
    return text[:MAX_LABEL_CHARS]


def make_detections(
    box_xyxy: Sequence[float],
    expression: str,
    confidence: Optional[float] = None,
    **attributes,
) -> fo.Detections:
    """A ``Detections`` holding one box (relative xyxy in, FiftyOne xywh stored)."""
    det = fo.Detection(**_detection_fields(box_xyxy, expression), confidence=confidence, **attributes)
    return fo.Detections(detections=[det])


def detections_doc(box_xyxy: Sequence[float], expression: str, confidence: Optional[float] = None) -> dict:
    """``make_detections(box_xyxy, expression, confidence).to_mongo()``, built directly.

    For bulk writes (``set_values(..., validate=False)`` of a declared ``Detections``
    field): about 20x cheaper than building and serializing the FiftyOne objects, which
    took more host time than the model when applying to a whole dataset on a GPU.
    ``tests/test_labels.py`` checks that it equals the FiftyOne form and reads back as it.
    """
    det = {"_id": ObjectId(), "_cls": "Detection", "attributes": {}, "tags": [],
           **_detection_fields(box_xyxy, expression)}
    if confidence is not None:
        det["confidence"] = float(confidence)
    return {"_cls": "Detections", "detections": [det]}


def _detection_fields(box_xyxy: Sequence[float], expression: str) -> dict:
    box = [min(max(float(v), 0.0), 1.0) for v in box_xyxy]
    return {"label": label_for(expression), "bounding_box": xyxy_to_fiftyone_xywh(box)}


def first_box_xyxy(label) -> Optional[list[float]]:
    """Relative xyxy of the first box of a ``Detections`` / ``Detection``, or None."""
    if label is None:
        return None
    if isinstance(label, fo.Detections):
        if not label.detections:
            return None
        label = label.detections[0]
    if label.bounding_box is None:
        return None
    return fiftyone_xywh_to_xyxy(label.bounding_box)
