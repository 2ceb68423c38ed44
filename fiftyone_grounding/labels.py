"""The one place where grounding boxes become FiftyOne labels and back.

Label scheme: every ground-truth and predicted ``Detection`` carries the referring
expression as its ``label``. FiftyOne's ``evaluate_detections`` only counts a match
when labels are equal (even with ``classwise=False``), so ground truth and
predictions must share one scheme; the expression also shows on the box in the App.
"""

from __future__ import annotations

from typing import Optional, Sequence

import fiftyone as fo

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
    box = [min(max(float(v), 0.0), 1.0) for v in box_xyxy]
    det = fo.Detection(
        label=label_for(expression),
        bounding_box=xyxy_to_fiftyone_xywh(box),
        confidence=confidence,
        **attributes,
    )
    return fo.Detections(detections=[det])


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
