"""How far a box's confidence can be trusted: the confidence's metrics, pure numpy.

All on scored samples, a missing prediction counting as IoU 0 and confidence 0:

- ``auroc``: how well the confidence tells boxes with IoU >= 0.5 from the others (0.5 is chance);
- ``ece``: expected calibration error, the mean gap between confidence and accuracy over
  10 equal-width confidence bins, weighted by their share of the samples (the criterion the
  calibration is fitted by: ``models/calibration.py``, where it lives);
- ``acc_at_50_coverage`` / ``acc_at_80_coverage``: Acc@0.5 of the 50% / 80% most confident.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ..models.calibration import CORRECT_IOU, expected_calibration_error

COVERAGES = (0.5, 0.8)


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> Optional[float]:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative (ties count half). None when either class is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks of tied scores (1-based)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy_at_coverage(confidences: Sequence[float], correct: Sequence[bool], coverage: float) -> Optional[float]:
    """Accuracy of the ``coverage`` share of the samples with the highest confidence (ties
    broken by sample order)."""
    conf = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if conf.size == 0:
        return None
    keep = max(1, int(math.ceil(coverage * conf.size)))
    order = np.argsort(-conf, kind="mergesort")[:keep]
    return float(correct[order].mean())


def confidence_metrics(ious: Sequence[float], confidences: Sequence[Optional[float]]) -> dict:
    """AUROC, ECE and accuracy at 50% / 80% coverage of the confidences of scored samples (a
    missing confidence counts as 0). All None when no sample has a confidence."""
    keys = ["auroc", "ece"] + [f"acc_at_{round(c * 100)}_coverage" for c in COVERAGES]
    present = [c for c in confidences if c is not None]
    if not present:
        return {k: None for k in keys}
    conf = np.asarray([0.0 if c is None else float(c) for c in confidences], dtype=np.float64)
    correct = np.asarray(ious, dtype=np.float64) >= CORRECT_IOU
    out = {"auroc": auroc(conf, correct), "ece": expected_calibration_error(conf, correct)}
    for c in COVERAGES:
        out[f"acc_at_{round(c * 100)}_coverage"] = accuracy_at_coverage(conf, correct, c)
    return out
