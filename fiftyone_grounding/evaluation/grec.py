"""Generalized referring expression comprehension (GREC) metrics, as gRefCOCO's official scorer.

A phrase may refer to no object, one or several. The official scorer (henghuiding/gRefCOCO,
``mdetr/datasets/refexp.py``, ``RefExpEvaluator.summarize``) judges each expression alone:

- the predicted boxes whose score is >= ``score_thresh`` (0.7) are kept;
- a **no-target** expression is right when no box is kept;
- a **target** expression: kept and true boxes are matched greedily, the pair of highest GIoU
  first, each box at most once, while that GIoU is >= ``iou_thresh`` (0.5); matched pairs are
  TP, kept boxes left over FP, true boxes left over FN, ``F1 = 2 TP / (2 TP + FP + FN)``; the
  expression is right when F1 is 1 (every true box found, nothing else kept).

``Pr@(F1=1, IoU>=0.5)`` is the share of right expressions; ``N-acc`` the share of no-target
expressions with no box kept; ``T-acc`` the share of target expressions with at least one box
kept (the scorer's TN / (TN + FP), whose names swap the usual roles). Boxes are normalized xyxy;
GIoU does not depend on the scale. Pure numpy: no torch, no FiftyOne.

Stored boxes answer only the thresholds at or above the confidence they were written from
(``written_from``): a multi-box model writes only its boxes >= its ``score_thresh``, so at a
lower threshold the boxes the scorer would keep were never stored, and the rates are None
(``answered`` False) rather than a copy of the row at ``written_from``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ..models.boxes import generalized_box_iou

SCORE_THRESH = 0.7  # the official scorer's thresh_score
IOU_THRESH = 0.5  # its thresh_iou (applied to GIoU)
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # thresholds of threshold_sweep


@dataclass(frozen=True)
class Expression:
    """One expression's predictions and truth: boxes (P, 4) with scores (P,), true boxes (G, 4);
    ``no_target`` True when the phrase refers to nothing (then G is 0)."""

    boxes: np.ndarray
    scores: np.ndarray
    truths: np.ndarray
    no_target: bool

    @classmethod
    def of(cls, boxes: Sequence, scores: Sequence, truths: Sequence, no_target: Optional[bool] = None) -> "Expression":
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        truths = np.asarray(truths, np.float64).reshape(-1, 4)
        if len(scores) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
        return cls(boxes, scores, truths, bool(len(truths) == 0 if no_target is None else no_target))


@dataclass(frozen=True)
class ExpressionScore:
    kept: int  # boxes at or above the score threshold
    tp: int
    fp: int
    fn: int
    f1: float
    correct: bool  # F1 == 1 (for no-target: nothing kept)
    no_target: bool


def greedy_matches(giou: np.ndarray, iou_thresh: float = IOU_THRESH) -> list[tuple[int, int]]:
    """The scorer's matching of predicted boxes (rows) to true boxes (columns) by their GIoU:
    the best remaining pair first, neither box matched again, while the pair reaches ``iou_thresh``."""
    giou = np.array(giou, dtype=np.float64)  # a copy: matched rows and columns are zeroed
    pairs = []
    for _ in range(min(giou.shape) if giou.size else 0):
        i, j = np.unravel_index(int(np.argmax(giou)), giou.shape)  # the best remaining pair
        if giou[i, j] < iou_thresh:
            break
        pairs.append((int(i), int(j)))
        giou[i, :] = 0.0  # as the scorer does: neither box matches again (0 < iou_thresh)
        giou[:, j] = 0.0
    return pairs


def score_expression(e: Expression, score_thresh: float = SCORE_THRESH,
                     iou_thresh: float = IOU_THRESH) -> ExpressionScore:
    """The official scorer's judgement of one expression."""
    order = np.argsort(-e.scores, kind="stable")  # the scorer sorts by score, highest first
    kept = e.boxes[order][e.scores[order] >= score_thresh]
    if e.no_target:
        f1 = 0.0 if len(kept) else 1.0
        return ExpressionScore(len(kept), 0, len(kept), 0, f1, f1 >= 1.0, True)
    giou = generalized_box_iou(kept[:, None, :], e.truths[None, :, :]) if len(kept) else np.zeros((0, len(e.truths)))
    tp = len(greedy_matches(giou, iou_thresh))
    fp, fn = len(kept) - tp, len(e.truths) - tp
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0
    return ExpressionScore(len(kept), tp, fp, fn, f1, f1 >= 1.0, False)


def answers(score_thresh: float, written_from: float = 0.0) -> bool:
    """Whether boxes written from confidence ``written_from`` answer ``score_thresh`` (a rounding
    slack of 1e-9: 0.1 * 3 answers 0.3)."""
    return score_thresh >= written_from - 1e-9


def grec_metrics(expressions: Iterable[Expression], score_thresh: float = SCORE_THRESH,
                 iou_thresh: float = IOU_THRESH, written_from: float = 0.0) -> dict:
    """``pr_f1`` (Pr@(F1=1, IoU>=0.5)), ``n_acc``, ``t_acc`` and the counts behind them; a rate
    is None where it has no expressions to count, and every rate is None (``answered`` False)
    where ``score_thresh`` is below ``written_from``, the confidence the boxes were written from."""
    scores = [score_expression(e, score_thresh, iou_thresh) for e in expressions]
    no_target = [s for s in scores if s.no_target]
    target = [s for s in scores if not s.no_target]
    answered = answers(score_thresh, written_from)

    def rate(hits: int, n: int) -> Optional[float]:
        return hits / n if n and answered else None

    return {
        "pr_f1": rate(sum(s.correct for s in scores), len(scores)),
        "n_acc": rate(sum(s.kept == 0 for s in no_target), len(no_target)),
        "t_acc": rate(sum(s.kept > 0 for s in target), len(target)),
        "count": len(scores),
        "no_target": len(no_target),
        "several_targets": sum(s.tp + s.fn > 1 for s in target),
        "score_thresh": score_thresh,
        "answered": answered,
    }


def threshold_sweep(expressions: Sequence[Expression], thresholds: Sequence[float] = SWEEP,
                    iou_thresh: float = IOU_THRESH, written_from: float = 0.0) -> list[dict]:
    """:func:`grec_metrics` at each score threshold (the trade-off between N-acc and T-acc); the
    thresholds below ``written_from`` get None rates (the boxes they would keep were not written)."""
    expressions = list(expressions)
    return [grec_metrics(expressions, t, iou_thresh, written_from) for t in thresholds]
