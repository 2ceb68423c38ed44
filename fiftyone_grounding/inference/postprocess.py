"""Post-processing: what a network returns -> the boxes and confidences that are written.

As detr's ``PostProcess``: the network returns normalized xyxy boxes that may reach past the
image and confidences as uncalibrated logits. :class:`PostProcess` clips the boxes to the
image, calibrates the confidences with the checkpoint's calibration and keeps a multi-box
model's boxes from its score threshold, the most confident first; :func:`batch_labels` turns
the result into each sample's label (``LabelMaker``, which applies FiftyOne's
``confidence_thresh``), and :func:`most_confident` picks the box that stands for a sample.

``GroundingModel.predict_boxes`` runs it for every path that predicts boxes: FiftyOne's
``apply_model``, the fast apply path, search and the grounding panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..models.base import GroundingOutput


class BoxPrediction(NamedTuple):
    """The boxes of a batch on the CPU, and the confidence of each (None without a quality head).

    A multi-box model also gives ``sets``: each phrase's kept boxes (k, 4) and their confidences
    (k,), the most confident first, k maybe 0; ``boxes`` is then each phrase's best box."""

    boxes: torch.Tensor  # (B, 4) normalized xyxy
    confidences: Optional[np.ndarray] = None  # (B,) in [0, 1]
    sets: Optional[list[tuple[np.ndarray, np.ndarray]]] = None


@dataclass(frozen=True)
class PostProcess:
    """A network's output -> :class:`BoxPrediction`, in two halves: :meth:`pack` where the model
    runs (one tensor, so that one copy brings everything to the host) and :meth:`__call__` on
    the host. ``calibration``: confidence logits -> confidences (the checkpoint's);
    ``score_thresh``: a multi-box model's boxes less confident than this are not kept."""

    calibration: Callable[[np.ndarray], np.ndarray]
    score_thresh: float

    @staticmethod
    def pack(out: GroundingOutput) -> torch.Tensor:
        """The boxes clipped to the image, and the logits of their confidences beside them:
        (B, Q, 5) every query's box of a multi-box model; (B, 5) one box and its confidence
        (the predicted IoU, times P(present) with a presence head); (B, 4) a model without a
        quality head."""
        out = out.clipped()  # boxes inside the image
        if out.scores is not None:
            return torch.cat([out.query_boxes.float(), out.box_confidence_logits()[..., None]], -1)  # (B, Q, 5)
        if out.quality is None:
            return out.boxes.float()  # (B, 4)
        return torch.cat([out.boxes.float(), out.confidence_logits()[:, None]], 1)  # (B, 5)

    def __call__(self, values: torch.Tensor) -> BoxPrediction:
        """Packed values on the host -> the boxes and their calibrated confidences."""
        if values.ndim == 3:  # a multi-box model: each phrase's boxes at or above the threshold
            boxes, confidences = values[..., :4].numpy(), self.calibration(values[..., 4].numpy())  # (B, Q)
            sets = []
            for row_boxes, row_conf in zip(boxes, confidences):
                order = np.argsort(-row_conf, kind="stable")
                order = order[row_conf[order] >= self.score_thresh]
                sets.append((row_boxes[order], row_conf[order]))
            best = values[torch.arange(len(values)), values[..., 4].argmax(1), :4]
            return BoxPrediction(best, None, sets)
        if values.shape[-1] == 4:
            return BoxPrediction(values)
        return BoxPrediction(values[:, :4], self.calibration(values[:, 4].numpy()), None)


def batch_labels(batch: dict, prediction: Optional[BoxPrediction], make_label: Callable) -> list:
    """A label per item of a collated batch, ``make_label(box_xyxy, phrase, confidence)``,
    None where the item was skipped. ``prediction``: the boxes of its valid items."""
    out: list = [None] * batch["size"]
    if prediction is not None and prediction.sets is not None:
        for i, phrase, (boxes, confidences) in zip(batch["valid"], batch["phrases"], prediction.sets):
            out[i] = make_label(boxes.tolist(), phrase, confidences.tolist())
    elif prediction is not None:
        confidences = (prediction.confidences.tolist() if prediction.confidences is not None
                       else [None] * len(batch["valid"]))
        for i, phrase, box, confidence in zip(batch["valid"], batch["phrases"], prediction.boxes.tolist(),
                                              confidences):
            out[i] = make_label(box, phrase, confidence)
    return out


def most_confident(confidences: Sequence[Optional[float]]) -> int:
    """The index of the most confident of a sample's boxes (a box without a confidence counts
    as the least confident; the first of equals)."""
    return int(np.argmax([c if c is not None else -1.0 for c in confidences]))
