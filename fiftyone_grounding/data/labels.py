"""The one place where grounding boxes become FiftyOne labels and back.

Label scheme: every ground-truth and predicted ``Detection`` carries one label from a small
vocabulary (``fields.DEFAULT_LABEL``, "referent", unless the user picks another) and the referring
expression as its ``expression`` attribute, which the App shows on the box. FiftyOne's
evaluation treats every distinct label as a class, so a label per phrase would make RefCOCO's
test set 10,752 classes (and a 10,752 x 10,752 confusion matrix in the Model Evaluation panel).

:class:`LabelMaker` is the post-processing step that every apply path uses: box, phrase and
confidence in, a ``Detections`` out (as a FiftyOne object, or in the database form that bulk
writes take), with FiftyOne's ``confidence_thresh`` semantics; :func:`detection_xyxy` and
:func:`valid_detection_xyxy` read a box back, for every reader of stored boxes. :func:`migrate_label_scheme`
converts datasets written with the earlier scheme (the phrase as the label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import fiftyone as fo
from bson import ObjectId

from ..models.boxes import clip_box_to_image, fiftyone_xywh_to_xyxy, is_valid_xyxy, xyxy_to_fiftyone_xywh
from .fields import DEFAULT_LABEL
from ..errors import InputError
from ..progress import fiftyone_progress

EXPRESSION_ATTR = "expression"  # the Detection attribute that holds the phrase
MAX_EXPRESSION_CHARS = 200


def expression_text(expression: str) -> str:
    """The phrase as a ``Detection`` carries it: whitespace-normalized, at most 200 characters."""
    text = " ".join(str(expression).split())
    return text[:MAX_EXPRESSION_CHARS]


def make_detections(
    box_xyxy: Sequence[float],
    expression: str,
    confidence: Optional[float] = None,
    label: str = DEFAULT_LABEL,
    **attributes,
) -> fo.Detections:
    """A ``Detections`` holding one box (relative xyxy in, FiftyOne xywh stored)."""
    det = fo.Detection(**_detection_fields(box_xyxy, expression, label), confidence=confidence, **attributes)
    return fo.Detections(detections=[det])


def make_box_detections(
    boxes_xyxy: Sequence[Sequence[float]],
    expression: str,
    label: str = DEFAULT_LABEL,
    per_box: Optional[Sequence[dict]] = None,
) -> fo.Detections:
    """A ground-truth ``Detections`` of zero, one or several boxes of one expression (gRefCOCO
    refers to none or several objects), each as :func:`make_detections` makes one; ``per_box``
    gives each box extra fields (e.g. RefCOCO-M's ``mask``)."""
    extras = list(per_box) if per_box is not None else [{}] * len(boxes_xyxy)
    if len(extras) != len(boxes_xyxy):
        raise InputError(f"per_box has {len(extras)} entries for {len(boxes_xyxy)} boxes")
    return fo.Detections(detections=[fo.Detection(**_detection_fields(box, expression, label), **extra)
                                     for box, extra in zip(boxes_xyxy, extras)])


def detections_doc(box_xyxy: Sequence[float], expression: str, confidence: Optional[float] = None,
                   label: str = DEFAULT_LABEL) -> dict:
    """``make_detections(box_xyxy, expression, confidence, label).to_mongo()``, built directly.

    For bulk writes (``set_values(..., validate=False)`` of a declared ``Detections``
    field): about 20x cheaper than building and serializing the FiftyOne objects, which
    took more host time than the model when applying to a whole dataset on a GPU.
    ``tests/test_labels.py`` checks that it equals the FiftyOne form and reads back as it.
    """
    det = {"_id": ObjectId(), "_cls": "Detection", "attributes": {}, "tags": [],
           **_detection_fields(box_xyxy, expression, label)}
    if confidence is not None:
        det["confidence"] = float(confidence)
    return {"_cls": "Detections", "detections": [det]}


def _detection_fields(box_xyxy: Sequence[float], expression: str, label: str) -> dict:
    box = clip_box_to_image(box_xyxy)
    return {"label": label, "bounding_box": xyxy_to_fiftyone_xywh(box), EXPRESSION_ATTR: expression_text(expression)}


def detection_xyxy(bounding_box) -> Optional[list[float]]:
    """Relative xyxy of one ``Detection.bounding_box`` (relative [x, y, w, h], as a label holds it or
    ``view.values("<field>.detections.bounding_box")`` reads it), or None where it is not four numbers."""
    if bounding_box is None or len(bounding_box) != 4:
        return None
    return fiftyone_xywh_to_xyxy(bounding_box)


def valid_detection_xyxy(bounding_box) -> Optional[list[float]]:
    """:func:`detection_xyxy` where it is a box (finite, positive width and height), else None."""
    box = detection_xyxy(bounding_box)
    return box if box is not None and is_valid_xyxy(box) else None


def _several(box_xyxy) -> bool:
    """Whether a model output is a list of boxes (a multi-box model's) rather than one box."""
    return len(box_xyxy) == 0 or not isinstance(box_xyxy[0], (int, float)) and hasattr(box_xyxy[0], "__len__")


@dataclass(frozen=True)
class LabelMaker:
    """Model output -> FiftyOne labels, the way every apply path writes them.

    A one-box model gives a box and its confidence, a multi-box model a list of boxes (maybe
    empty) and a list of confidences: either becomes one ``Detections``. ``confidence_thresh``
    works as in FiftyOne's ``apply_model``: a box whose confidence is below it, or None, is
    dropped (a sample whose boxes all are gets an empty ``Detections``).
    """

    label: str = DEFAULT_LABEL
    confidence_thresh: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.label, str) or not self.label:
            raise InputError("The label of the boxes must be a non-empty string, e.g. 'referent'")

    def keeps(self, confidence: Optional[float]) -> bool:
        return self.confidence_thresh is None or (confidence is not None and confidence >= self.confidence_thresh)

    def _kept(self, box_xyxy, confidence) -> list[tuple]:
        pairs = list(zip(box_xyxy, confidence)) if _several(box_xyxy) else [(box_xyxy, confidence)]
        return [(box, c) for box, c in pairs if self.keeps(c)]

    def detections(self, box_xyxy, expression: str, confidence) -> fo.Detections:
        kept = self._kept(box_xyxy, confidence)
        return fo.Detections(detections=[fo.Detection(**_detection_fields(box, expression, self.label), confidence=c)
                                         for box, c in kept])

    def doc(self, box_xyxy, expression: str, confidence) -> dict:
        """The database form of :meth:`detections`, for bulk writes."""
        kept = self._kept(box_xyxy, confidence)
        return {"_cls": "Detections", "detections": [detections_doc(box, expression, c, self.label)["detections"][0]
                                                      for box, c in kept]}


def declare_expression_attribute(dataset, field: str) -> None:
    """Declare ``<field>.detections.expression`` so the App lists and filters it."""
    path = f"{field}.detections.{EXPRESSION_ATTR}"
    if not dataset.has_field(path):
        dataset.add_sample_field(path, fo.StringField)


def migrate_label_scheme(dataset, fields: Optional[Sequence[str]] = None, label: str = DEFAULT_LABEL,
                         progress: Optional[bool] = None) -> dict[str, int]:
    """Convert ``Detections`` fields written with the earlier label scheme (the phrase as each
    box's label) to this one: the old label moves to the ``expression`` attribute (unless the
    box already has one) and the label becomes ``label``.

    ``fields``: the ``Detections`` fields to convert (default: all of them). Boxes already in
    the scheme are left as they are, so running it twice changes nothing. Returns the number
    of boxes changed per field.
    """
    schema = dataset.get_field_schema()
    detection_fields = [name for name, f in schema.items()
                        if isinstance(f, fo.EmbeddedDocumentField) and issubclass(f.document_type, fo.Detections)]
    if fields is None:
        fields = detection_fields
    unknown = [f for f in fields if f not in detection_fields]
    if unknown:
        raise InputError(f"{unknown} are not Detections fields of {dataset.name!r}; its Detections fields: "
                         f"{detection_fields}")
    changed = {}
    for field in fields:
        labels, expressions = dataset.values([f"{field}.detections.label", f"{field}.detections.{EXPRESSION_ATTR}"])
        count = 0
        new_labels, new_expressions = [], []
        for sample_labels, sample_expressions in zip(labels, expressions):
            if sample_labels is None:
                new_labels.append(None)
                new_expressions.append(None)
                continue
            sample_expressions = sample_expressions or [None] * len(sample_labels)
            row_labels, row_expressions = [], []
            for old, expression in zip(sample_labels, sample_expressions):
                if old != label:
                    count += 1
                if expression is None and old != label and old is not None:
                    expression = expression_text(old)
                row_labels.append(label)
                row_expressions.append(expression)
            new_labels.append(row_labels)
            new_expressions.append(row_expressions)
        if count:
            with fiftyone_progress(progress, f"converting {field}") as shown:
                dataset.set_values(f"{field}.detections.{EXPRESSION_ATTR}", new_expressions, progress=shown)
                dataset.set_values(f"{field}.detections.label", new_labels, progress=shown)
        declare_expression_attribute(dataset, field)
        changed[field] = count
    return changed
