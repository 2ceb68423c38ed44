"""Grounding metrics, pure numpy (no FiftyOne): every metric's key and label, the metrics of
per-expression IoUs (mIoU, Acc@0.5, Acc@0.75 and the confidence's, ``confidence.py``), and COCO's
average precision for a mAP over IoU 0.50:0.95.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .confidence import COVERAGES, confidence_metrics

MAP_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))

# Every metric of a grounding evaluation: key, label in tables and the App, whether lower is better.
METRICS = (
    ("miou", "mIoU", False),
    ("acc50", "Acc@0.5", False),
    ("acc75", "Acc@0.75", False),
    ("auroc", "confidence AUROC", False),
    ("ece", "confidence ECE", True),
) + tuple((f"acc_at_{round(c * 100)}_coverage", f"Acc@0.5, {round(c * 100)}% most confident", False)
          for c in COVERAGES)


# The generalized grounding metrics (gRefCOCO's official scorer, grec.py).
GREC_METRICS = (
    ("pr_f1", "Pr@(F1=1, IoU>=0.5)", False),
    ("n_acc", "N-acc (no-target phrases with no box)", False),
    ("t_acc", "T-acc (target phrases with a box)", False),
)


def grounding_metrics(ious, confidences: Optional[Sequence] = None) -> dict:
    """The metrics of per-expression IoUs (a missing prediction counts as 0) and, given, their
    confidences (None where a box has none)."""
    ious = np.asarray(ious, dtype=np.float64)
    if ious.size == 0:
        return {**{k: None for k, _, _ in METRICS}, "miou": float("nan"), "acc50": float("nan"),
                "acc75": float("nan"), "count": 0}
    out = {
        "miou": float(ious.mean()),
        "acc50": float((ious >= 0.5).mean()),
        "acc75": float((ious >= 0.75).mean()),
        "count": int(ious.size),
    }
    out.update(confidence_metrics(ious.tolist(), list(confidences) if confidences is not None
                                  else [None] * int(ious.size)))
    return out


def average_precision(ious: np.ndarray, confidences: np.ndarray, num_truths: int, threshold: float) -> float:
    """COCO's 101-point interpolated AP of one class: predictions ranked by confidence (ties in
    their given order, never true positives first), each a true positive when its IoU with its
    own sample's true box is at least ``threshold``."""
    if num_truths == 0:
        return float("nan")
    if len(ious) == 0:
        return 0.0
    order = np.argsort(-confidences, kind="mergesort")
    tp = ious[order] >= threshold
    cum_tp = np.cumsum(tp)
    precision = cum_tp / np.arange(1, len(tp) + 1)
    recall = cum_tp / num_truths
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, np.linspace(0.0, 1.0, 101), side="left")
    return float(np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0).mean())
