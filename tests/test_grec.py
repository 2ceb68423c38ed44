"""The GREC scorer on hand-made cases whose right answer follows from the official scorer's rules."""

import numpy as np
import pytest

from fiftyone_grounding.boxes import box_iou, generalized_box_iou
from fiftyone_grounding.grec import Expression, grec_metrics, score_expression, threshold_sweep

A = [0.05, 0.05, 0.30, 0.30]
B = [0.50, 0.10, 0.80, 0.40]
C = [0.20, 0.60, 0.45, 0.95]


def test_no_target_is_right_only_when_no_box_passes_the_threshold():
    quiet = score_expression(Expression.of([A], [0.69], [], no_target=True))
    assert quiet.correct and quiet.kept == 0 and quiet.f1 == 1.0
    loud = score_expression(Expression.of([A, B], [0.70, 0.2], [], no_target=True))  # >= 0.7 is kept
    assert not loud.correct and loud.kept == 1 and loud.f1 == 0.0
    m = grec_metrics([Expression.of([A], [0.69], [], True), Expression.of([A], [0.9], [], True)])
    assert m["n_acc"] == 0.5 and m["t_acc"] is None and m["pr_f1"] == 0.5 and m["no_target"] == 2


def test_three_targets_with_one_missed_is_wrong():
    s = score_expression(Expression.of([A, B], [0.9, 0.8], [A, B, C]))
    assert (s.tp, s.fp, s.fn) == (2, 0, 1) and s.f1 == pytest.approx(0.8) and not s.correct
    s = score_expression(Expression.of([C, A, B], [0.75, 0.9, 0.8], [A, B, C]))
    assert (s.tp, s.fp, s.fn) == (3, 0, 0) and s.correct


def test_a_duplicate_box_is_a_false_positive():
    near_a = [0.06, 0.05, 0.30, 0.31]
    s = score_expression(Expression.of([A, near_a], [0.9, 0.85], [A]))
    assert (s.tp, s.fp, s.fn) == (1, 1, 0) and s.f1 == pytest.approx(2 / 3) and not s.correct
    # the duplicate below the threshold is not kept: right
    assert score_expression(Expression.of([A, near_a], [0.9, 0.5], [A])).correct


def test_matching_uses_giou_not_iou():
    truth = np.array([0.0, 0.0, 0.5, 0.5])
    pred = np.array([0.09, 0.09, 0.59, 0.59])  # shifted along the diagonal: a larger enclosing box
    assert box_iou(pred, truth) >= 0.5 > generalized_box_iou(pred, truth)
    s = score_expression(Expression.of([pred], [0.9], [truth]))
    assert (s.tp, s.fp, s.fn) == (0, 1, 1) and not s.correct
    assert score_expression(Expression.of([pred], [0.9], [truth]), iou_thresh=0.45).correct


def test_greedy_matching_takes_the_best_pair_first_and_each_box_once():
    # p0 and p1 both cover t0 (p0 better); t1 is covered by neither. (p0, t0) is matched first, then
    # p1 has no truth left above 0.5: one TP, p1 a false positive, t1 missed.
    t0, t1 = [0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0]
    p0, p1 = [0.0, 0.0, 0.4, 0.41], [0.02, 0.0, 0.4, 0.4]
    s = score_expression(Expression.of([p0, p1], [0.9, 0.8], [t0, t1]))
    assert (s.tp, s.fp, s.fn) == (1, 1, 1)


def test_empty_predictions_and_order_of_scores():
    s = score_expression(Expression.of(np.zeros((0, 4)), [], [A]))
    assert (s.kept, s.tp, s.fn, s.correct) == (0, 0, 1, False)
    assert score_expression(Expression.of(np.zeros((0, 4)), [], [], True)).correct
    m = grec_metrics([Expression.of([A], [0.9], [A]), Expression.of([], [], [B]), Expression.of([], [], [], True)])
    assert m["pr_f1"] == pytest.approx(2 / 3) and m["t_acc"] == 0.5 and m["n_acc"] == 1.0
    with pytest.raises(ValueError, match="scores"):
        Expression.of([A, B], [0.9], [A])


def test_the_threshold_sweep_trades_no_target_accuracy_for_target_accuracy():
    rng = np.random.default_rng(0)
    expressions = []
    for k in range(60):
        truths = [] if k % 3 == 0 else [A] if k % 3 == 1 else [A, C]
        boxes = [A, C, B]
        expressions.append(Expression.of(boxes, rng.random(3), truths))
    sweep = threshold_sweep(expressions, (0.2, 0.5, 0.8))
    n_acc, t_acc = [r["n_acc"] for r in sweep], [r["t_acc"] for r in sweep]
    assert n_acc == sorted(n_acc) and t_acc == sorted(t_acc, reverse=True)
    assert [r["score_thresh"] for r in sweep] == [0.2, 0.5, 0.8] and sweep[0]["several_targets"] == 20
