"""Reading a view and scoring it: each sample's IoU, the grounding metrics overall and per split
(:func:`evaluate_grounding`), the generalized grounding metrics (:func:`evaluate_grec`), and the
constant-box baseline.

Each sample is scored alone: its first predicted box against its first valid ground-truth box,
so a prediction is never matched with another sample's box. Samples without a valid
ground-truth box are not scored (``unscored``); a sample without a prediction scores IoU 0.
Today's models predict one box, so samples whose ground truth holds several boxes, or whose
phrase refers to nothing (``no_target``, gRefCOCO), are not scored either, and counted apart.

- :func:`evaluate_grounding`: mIoU, Acc@0.5, Acc@0.75 and the confidence's metrics (see
  ``confidence.py``), overall and per split, vectorized, with each sample's IoU written to a
  field in one bulk write.
- :func:`evaluate_grec`: generalized grounding (a phrase may refer to no object, one or
  several; gRefCOCO): ``grec.py``'s scorer, exactly as the official one, on every sample's
  predicted boxes and their confidences: Pr@(F1=1, IoU>=0.5), N-acc, T-acc, overall, per split
  and over a sweep of the score threshold (only the thresholds the stored boxes answer: none
  below the confidence they were written from), each sample's F1 written to a field.
  :func:`evaluate_grounding` adds it where the view has such phrases.

The same scores as a FiftyOne evaluation run: ``fiftyone_run.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from . import grec
from ..data.fields import NO_TARGET_FIELD
from ..errors import InputError
from ..fiftyone_api import root_dataset
from ..data.labels import valid_detection_xyxy
from ..models.boxes import box_iou
from ..runs import written_from
from .metrics import grounding_metrics
from .tables import format_grec_table, format_table


@dataclass
class SampleScores:
    """Per-sample scores of a view, in the view's order."""

    ids: list  # sample ids
    ious: np.ndarray  # (N,) IoU of the first predicted box with the first valid true box; NaN: unscored
    confidences: list  # the first predicted box's confidence, or None
    gt_ids: list  # id of the true box scored, or None (unscored)
    pred_ids: list  # id of the first predicted box, or None (no prediction)
    gt_labels: list
    pred_labels: list
    no_target: int = 0  # of the unscored, samples whose phrase refers to nothing (gRefCOCO)
    several_targets: int = 0  # of the unscored, samples with several true boxes

    @property
    def scored(self) -> np.ndarray:
        return ~np.isnan(self.ious)


def _first_valid(boxes, ids, labels) -> tuple:
    """(xyxy, id, label) of the first box of a sample that is a box (finite, positive size)."""
    for i, box in enumerate(boxes or []):
        xyxy = valid_detection_xyxy(box)
        if xyxy is not None:
            return xyxy, ids[i], labels[i]
    return None, None, None


def score_samples(view, pred_field: str, gt_field: str) -> SampleScores:
    """Score every sample of ``view`` with one bulk read and one vectorized IoU."""
    for name in (pred_field, gt_field):
        if not view.has_field(name):
            raise InputError(f"The dataset has no field {name!r}; its fields: {sorted(view.get_field_schema())}")
    ids, gt_boxes, gt_ids, gt_labels, pred_boxes, pred_ids, pred_labels, pred_confs = view.values([
        "id", f"{gt_field}.detections.bounding_box", f"{gt_field}.detections.id", f"{gt_field}.detections.label",
        f"{pred_field}.detections.bounding_box", f"{pred_field}.detections.id", f"{pred_field}.detections.label",
        f"{pred_field}.detections.confidence"])
    n = len(ids)
    no_target = view.values(NO_TARGET_FIELD) if view.has_field(NO_TARGET_FIELD) else [None] * n
    ious = np.full(n, np.nan)
    out = SampleScores(list(ids), ious, [None] * n, [None] * n, [None] * n, [None] * n, [None] * n)
    pairs = []  # (sample index, predicted xyxy, true xyxy)
    for i in range(n):
        if no_target[i]:
            out.no_target += 1
            continue
        if len(gt_boxes[i] or []) > 1:
            out.several_targets += 1
            continue
        gt, gt_id, gt_label = _first_valid(gt_boxes[i], gt_ids[i] or [], gt_labels[i] or [])
        if gt is None:
            continue
        out.gt_ids[i], out.gt_labels[i] = gt_id, gt_label
        ious[i] = 0.0
        if pred_boxes[i]:
            out.pred_ids[i], out.pred_labels[i] = pred_ids[i][0], pred_labels[i][0]
            out.confidences[i] = pred_confs[i][0]
            pred = valid_detection_xyxy(pred_boxes[i][0])
            if pred is not None:
                pairs.append((i, pred, gt))
    if pairs:
        index = np.array([i for i, _, _ in pairs])
        p = np.array([b for _, b, _ in pairs], dtype=np.float64)
        g = np.array([b for _, _, b in pairs], dtype=np.float64)
        ious[index] = box_iou(p, g, eps=0.0)
    return out


def _split_metrics(scores: SampleScores, splits) -> dict:
    scored = scores.scored
    out = {}
    for name in sorted({s for s in splits if s is not None}, key=str):
        members = scored & np.array([s == name for s in splits])
        out[name] = grounding_metrics(scores.ious[members], [scores.confidences[i] for i in np.flatnonzero(members)])
    return out


def metrics_of(scores: SampleScores, view, split_field: Optional[str]) -> dict:
    """:func:`evaluate_grounding`'s dict of ``scores`` (less ``iou_field`` and ``grec``): the metrics
    overall and per split of ``split_field`` where the view has it, and the samples counted apart."""
    scored = scores.scored
    confidences = [scores.confidences[i] for i in np.flatnonzero(scored)]
    result = {"overall": grounding_metrics(scores.ious[scored], confidences), "splits": {},
              "missing_predictions": int(sum(1 for i in np.flatnonzero(scored) if scores.pred_ids[i] is None)),
              "unscored": int((~scored).sum()), "no_target": scores.no_target,
              "several_targets": scores.several_targets}
    if split_field and view.has_field(split_field):
        result["splits"] = _split_metrics(scores, view.values(split_field))
    return result


def evaluate_grounding(
    view,
    pred_field: str = "predictions",
    gt_field: str = "ground_truth",
    split_field: Optional[str] = "split",
    iou_field: Optional[str] = None,
    print_table: bool = True,
) -> dict:
    """Score predictions against ground truth and store a per-sample IoU field.

    Returns ``{"overall": {miou, acc50, acc75, count, auroc, ece, acc_at_50_coverage,
    acc_at_80_coverage}, "splits": {name: {...}}, "missing_predictions": n, "unscored": n,
    "no_target": n, "several_targets": n, "iou_field": name}``, and ``"grec"`` (:func:`evaluate_grec`)
    where the view holds phrases of no object or several; ``unscored`` samples have no valid
    ground-truth box (none, non-finite, zero or negative size), several (``several_targets``) or
    a phrase that refers to nothing (``no_target``). The confidence metrics are None for boxes without confidences. The
    IoU goes to ``iou_field`` (default ``"<pred_field>_iou"``) so the App can sort and filter by it.
    """
    iou_field = iou_field or f"{pred_field}_iou"
    scores = score_samples(view, pred_field, gt_field)
    write_sample_values(view, iou_field, scores.ids, [None if np.isnan(v) else float(v) for v in scores.ious])
    result = {**metrics_of(scores, view, split_field), "iou_field": iou_field}
    if has_generalized_phrases(view, gt_field):
        result["grec"] = evaluate_grec(view, pred_field, gt_field, split_field)
    if print_table:
        print(format_table(result))
        if "grec" in result:
            print(format_grec_table(result["grec"]))
    return result


def has_generalized_phrases(view, gt_field: str = "ground_truth") -> bool:
    """Whether ``view`` holds phrases of no object (``no_target``) or of several boxes."""
    from fiftyone import ViewField as F

    if view.has_field(NO_TARGET_FIELD) and view.match(F(NO_TARGET_FIELD) == True).count():  # noqa: E712
        return True
    return bool(view.match(F(f"{gt_field}.detections").length() > 1).count())


def grec_expressions(view, pred_field: str, gt_field: str) -> tuple[list, list]:
    """(sample ids, ``grec.Expression`` per sample) of a view, in one bulk read. A predicted box
    without a confidence (a model without a quality head) counts as certain; a sample not marked
    ``no_target`` whose ground truth holds no valid box is left out (None)."""
    for name in (pred_field, gt_field):
        if not view.has_field(name):
            raise InputError(f"The dataset has no field {name!r}; its fields: {sorted(view.get_field_schema())}")
    ids, gt_boxes, pred_boxes, pred_confs = view.values(
        ["id", f"{gt_field}.detections.bounding_box", f"{pred_field}.detections.bounding_box",
         f"{pred_field}.detections.confidence"])
    no_target = view.values(NO_TARGET_FIELD) if view.has_field(NO_TARGET_FIELD) else [None] * len(ids)

    def valid(boxes) -> list:
        return [xyxy for xyxy in map(valid_detection_xyxy, boxes or []) if xyxy is not None]

    expressions = []
    for gts, preds, confs, nothing in zip(gt_boxes, pred_boxes, pred_confs, no_target):
        truths = [] if nothing else valid(gts)
        if not truths and not nothing:
            expressions.append(None)
            continue
        kept = [(b, 1.0 if c is None else float(c)) for b, c in zip(map(valid_detection_xyxy, preds or []), confs or [])
                if b is not None]
        expressions.append(grec.Expression.of([b for b, _ in kept], [c for _, c in kept],
                                              truths, bool(nothing)))
    return list(ids), expressions


def boxes_written_from(view, pred_field: str, score_thresh: float = grec.SCORE_THRESH,
                       applied_thresh: Optional[float] = None) -> tuple[float, str]:
    """``(confidence, source)``: the confidence from which the boxes of ``pred_field`` were
    written, so the lowest score threshold they answer (a multi-box model writes only its boxes
    >= its ``score_thresh``, 0.7 by default: the boxes a threshold of 0.5 would add were never
    stored). In order:

    - ``applied_thresh``, where given (``source`` "given");
    - the field's record (``runs.written_from``: every apply path of this package records the
      ``score_thresh`` of a multi-box model and the ``confidence_thresh``; ``source`` "record");
    - else (FiftyOne's own ``apply_model``, imported predictions; ``source`` "assumed") the
      lower of ``score_thresh`` and the lowest stored confidence. A threshold below the lowest
      stored confidence cannot tell a box below it from a box never written, so it is not
      answered, except the evaluation's own ``score_thresh``: like any scorer of exported
      predictions, an evaluation trusts that the boxes it is given are those its threshold
      keeps. With no confidence stored at all, every threshold keeps every box: 0.0.
    """
    if applied_thresh is not None:
        return float(applied_thresh), "given"
    recorded = written_from(view, pred_field)
    if recorded is not None:
        return recorded, "record"
    lowest, _ = view.bounds(f"{pred_field}.detections.confidence")
    return (0.0 if lowest is None else min(float(lowest), float(score_thresh))), "assumed"


def evaluate_grec(view, pred_field: str = "predictions", gt_field: str = "ground_truth",
                  split_field: Optional[str] = "split", score_thresh: float = grec.SCORE_THRESH,
                  f1_field: Optional[str] = None, thresholds: Sequence[float] = grec.SWEEP,
                  write: bool = True, applied_thresh: Optional[float] = None) -> dict:
    """Generalized grounding metrics of a view (see ``grec.py``): ``{"overall": {pr_f1, n_acc,
    t_acc, count, no_target, several_targets, score_thresh, answered}, "splits": {...}, "sweep":
    [...], "unscored": n, "f1_field": name, "written_from": confidence, "written_from_source": how
    it is known}``. Each scored sample's F1 goes to ``f1_field`` (default ``"<pred_field>_f1"``;
    nothing is written with ``write=False``): sort by it in the App to see the phrases that were
    missed.

    Only the thresholds the stored boxes answer are scored: at a threshold below the confidence
    the boxes were written from (:func:`boxes_written_from`: ``applied_thresh`` where given, else
    the field's record, else the lower of ``score_thresh`` and the lowest stored confidence),
    the rates are None and ``answered`` False, in the sweep and, where ``score_thresh`` itself is
    below it, overall, per split and in the F1 field (None). To sweep lower, apply the model
    with a lower ``score_thresh``."""
    f1_field = f1_field or f"{pred_field}_f1"
    ids, expressions = grec_expressions(view, pred_field, gt_field)
    lowest, source = boxes_written_from(view, pred_field, score_thresh, applied_thresh)
    scored = [i for i, e in enumerate(expressions) if e is not None]
    if write:
        answered = grec.answers(score_thresh, lowest)
        judged = {i: grec.score_expression(expressions[i], score_thresh) for i in scored}
        write_sample_values(view, f1_field, [ids[i] for i in scored],
                             [judged[i].f1 if answered else None for i in scored])
    chosen = [expressions[i] for i in scored]
    result = {"overall": grec.grec_metrics(chosen, score_thresh, written_from=lowest), "splits": {},
              "sweep": grec.threshold_sweep(chosen, thresholds, written_from=lowest),
              "unscored": len(ids) - len(scored), "f1_field": f1_field, "written_from": lowest,
              "written_from_source": source}
    if split_field and view.has_field(split_field):
        splits = view.values(split_field)
        for name in sorted({splits[i] for i in scored if splits[i] is not None}, key=str):
            result["splits"][name] = grec.grec_metrics([expressions[i] for i in scored if splits[i] == name],
                                                       score_thresh, written_from=lowest)
    return result


def write_sample_values(view, field: str, ids: list, values: list) -> None:
    """``field`` of the samples ``ids`` set to ``values``, in one bulk write by id."""
    import fiftyone as fo

    dataset = root_dataset(view)
    if not dataset.has_field(field):
        known = [v for v in values if v is not None]
        kind = fo.IntField if known and all(isinstance(v, int) for v in known) else fo.FloatField
        dataset.add_sample_field(field, kind)
    dataset.set_values(field, dict(zip(ids, values)), key_field="id", validate=False)


def mean_box(view, gt_field: str = "ground_truth") -> list[float]:
    """Mean ground-truth box (relative xyxy) of a view."""
    boxes = [b for b, _, _ in (_first_valid(bb, [None] * len(bb or []), [None] * len(bb or []))
                               for bb in view.values(f"{gt_field}.detections.bounding_box")) if b is not None]
    if not boxes:
        raise InputError("No ground-truth boxes to average: the view has no valid box")
    return np.asarray(boxes, dtype=np.float64).mean(0).tolist()


def constant_box_miou(train_view, test_view, gt_field: str = "ground_truth") -> float:
    """Test mIoU of always predicting the mean training box: the floor a model must beat."""
    box = mean_box(train_view, gt_field)
    gts = [b for b, _, _ in (_first_valid(bb, [None] * len(bb or []), [None] * len(bb or []))
                             for bb in test_view.values(f"{gt_field}.detections.bounding_box")) if b is not None]
    g = np.asarray(gts, dtype=np.float64)
    p = np.broadcast_to(np.asarray(box, dtype=np.float64), g.shape)
    return float(box_iou(p, g, eps=0.0).mean())
