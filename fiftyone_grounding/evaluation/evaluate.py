"""Grounding evaluation: its metrics, and a FiftyOne evaluation run that holds at RefCOCO scale.

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
- :func:`evaluate_in_fiftyone`: the same scores as a FiftyOne evaluation run
  (:class:`GroundingEvaluationConfig`, method ``"grounding"``), written in bulk: TP/FP/FN on every
  sample and box as FiftyOne's detection evaluation writes them, the sample IoU field, a mAP over
  IoU 0.50:0.95 ranked by the real confidence, the grounding metrics as custom metrics, and the
  split and category fields as the Model Evaluation panel's scenarios.
  ``dataset.delete_evaluation`` / ``rename_evaluation`` remove or rename every field it wrote.
  ``dataset.evaluate_detections(pred, gt, method=GroundingEvaluationConfig)`` runs the same
  method through FiftyOne's own per-sample loop (slower; the same result).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

import fiftyone.utils.eval.detection as foud

from . import grec
from ..models.boxes import box_iou, fiftyone_xywh_to_xyxy, is_valid_xyxy
from ..data.fields import NO_TARGET_FIELD
from ..models.confidence import COVERAGES, confidence_metrics
from ..errors import InputError
from ..runs import checkpoint_of, record_evaluation, written_from
from ..fiftyone_api import root_dataset, dataset_id

THRESHOLDS = (0.5, 0.75)
MAP_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))
METHOD = "grounding"
MISSING = "(none)"  # FiftyOne's label for "no match" in the results' ytrue / ypred
SCENARIO_FIELDS = ("split", "category")

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
        xyxy = fiftyone_xywh_to_xyxy(box) if box is not None and len(box) == 4 else None
        if xyxy is not None and is_valid_xyxy(xyxy):
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
            box = pred_boxes[i][0]
            pred = fiftyone_xywh_to_xyxy(box) if box is not None and len(box) == 4 else None
            if pred is not None and is_valid_xyxy(pred):
                pairs.append((i, pred, gt))
    if pairs:
        index = np.array([i for i, _, _ in pairs])
        p = np.array([b for _, b, _ in pairs], dtype=np.float64)
        g = np.array([b for _, _, b in pairs], dtype=np.float64)
        ious[index] = box_iou(p, g, eps=0.0)
    return out


def sample_ious(view, pred_field: str, gt_field: str) -> tuple[list[str], list[Optional[float]]]:
    """Per-sample IoU of the first predicted with the first valid true box: None where the
    sample has no valid true box, 0.0 where it has no prediction."""
    scores = score_samples(view, pred_field, gt_field)
    return scores.ids, [None if np.isnan(v) else float(v) for v in scores.ious]


def _split_metrics(scores: SampleScores, splits) -> dict:
    scored = scores.scored
    out = {}
    for name in sorted({s for s in splits if s is not None}, key=str):
        members = scored & np.array([s == name for s in splits])
        out[name] = grounding_metrics(scores.ious[members], [scores.confidences[i] for i in np.flatnonzero(members)])
    return out


def _metrics_of(scores: SampleScores, view, split_field: Optional[str]) -> dict:
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
    _write_sample_values(view, iou_field, scores.ids, [None if np.isnan(v) else float(v) for v in scores.ious])
    result = {**_metrics_of(scores, view, split_field), "iou_field": iou_field}
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
        out = []
        for box in boxes or []:
            xyxy = fiftyone_xywh_to_xyxy(box) if box is not None and len(box) == 4 else None
            if xyxy is not None and is_valid_xyxy(xyxy):
                out.append(xyxy)
        return out

    expressions = []
    for gts, preds, confs, nothing in zip(gt_boxes, pred_boxes, pred_confs, no_target):
        truths = [] if nothing else valid(gts)
        if not truths and not nothing:
            expressions.append(None)
            continue
        kept = [(b, 1.0 if c is None else float(c)) for b, c in zip(preds or [], confs or [])
                if b is not None and len(b) == 4 and is_valid_xyxy(fiftyone_xywh_to_xyxy(b))]
        expressions.append(grec.Expression.of([fiftyone_xywh_to_xyxy(b) for b, _ in kept], [c for _, c in kept],
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
        _write_sample_values(view, f1_field, [ids[i] for i in scored],
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


_WRITTEN_FROM = {"given": "as given", "record": "the field's record",
                 "assumed": "no record: the lower of the threshold and the lowest stored confidence"}


def format_grec_table(result: dict) -> str:
    """The generalized grounding table: one row per split and overall, then the sweep ("-": a
    threshold the stored boxes cannot answer, with a note saying why)."""
    rows = [(name, m) for name, m in result["splits"].items()] + [("overall", result["overall"])]
    width = max([10] + [len(str(name)) for name, _ in rows])
    head = f"{'split':<{width}} | {'count':>6} | {'no-target':>9} | {'Pr@F1=1':>7} | {'N-acc':>6} | {'T-acc':>6}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        lines.append(f"{name:<{width}} | {m['count']:>6} | {m['no_target']:>9} | {_fmt(m['pr_f1'], 7)} | "
                     f"{_fmt(m['n_acc'], 6)} | {_fmt(m['t_acc'], 6)}")
    lines.append(f"(boxes kept at confidence >= {result['overall']['score_thresh']:g}, matched at GIoU >= 0.5; "
                 "Pr@F1=1: the share of phrases with every true box found and nothing else)")
    lines.append("sweep of the threshold: " + ", ".join(
        f"{r['score_thresh']:g}: {_fmt(r['pr_f1'], 0).strip()}" for r in result["sweep"]))
    unanswered = [r["score_thresh"] for r in result["sweep"] + [result["overall"]] if not r.get("answered", True)]
    if unanswered:
        source = result.get("written_from_source")
        below = ", ".join(f"{t:g}" for t in sorted(set(unanswered)))
        why = ("a box below it cannot be told from a box never written" if source == "assumed"
               else "the boxes they would keep were never stored")
        lines.append(f"(the boxes {'are taken as' if source == 'assumed' else 'were'} written from confidence "
                     f"{result['written_from']:g} ({_WRITTEN_FROM.get(source, source)}): the thresholds below it "
                     f"({below}) are not scored, since {why}; apply the model with a lower score_thresh to "
                     "score them)")
    return "\n".join(lines)


def _write_sample_values(view, field: str, ids: list, values: list) -> None:
    """``field`` of the samples ``ids`` set to ``values``, in one bulk write by id."""
    import fiftyone as fo

    dataset = root_dataset(view)
    if not dataset.has_field(field):
        known = [v for v in values if v is not None]
        kind = fo.IntField if known and all(isinstance(v, int) for v in known) else fo.FloatField
        dataset.add_sample_field(field, kind)
    dataset.set_values(field, dict(zip(ids, values)), key_field="id", validate=False)


def format_table(result: dict) -> str:
    """The metric table: one row per split and overall."""
    rows = [(name, m) for name, m in result["splits"].items()] + [("overall", result["overall"])]
    confident = any(m.get("auroc") is not None for _, m in rows)
    width = max([10] + [len(str(name)) for name, _ in rows])  # refcocox's splits: "refcoco+/testA"
    head = f"{'split':<{width}} | {'count':>6} | {'mIoU':>6} | {'Acc@0.5':>7} | {'Acc@0.75':>8}"
    if confident:
        head += f" | {'AUROC':>6} | {'ECE':>6} | {'Acc@50%':>7} | {'Acc@80%':>7}"
    lines = [head, "-" * len(head)]
    for name, m in rows:
        line = f"{name:<{width}} | {m['count']:>6} | {m['miou']:>6.4f} | {m['acc50']:>7.4f} | {m['acc75']:>8.4f}"
        if confident:
            line += " | " + " | ".join(_fmt(m.get(k), w) for k, w in (
                ("auroc", 6), ("ece", 6), ("acc_at_50_coverage", 7), ("acc_at_80_coverage", 7)))
        lines.append(line)
    if confident:
        lines.append("(AUROC: the confidence telling IoU >= 0.5 from < 0.5; ECE: its calibration error; "
                     "Acc@50%/80%: Acc@0.5 of the 50%/80% most confident)")
    if result.get("missing_predictions"):
        lines.append(f"({result['missing_predictions']} samples had no prediction and count as IoU 0)")
    apart = {"no_target": "refer to nothing (no_target)", "several_targets": "have several true boxes"}
    invalid = result.get("unscored", 0) - sum(result.get(k, 0) for k in apart)
    if invalid:
        lines.append(f"({invalid} samples have no valid ground-truth box and are not scored)")
    for key, text in apart.items():
        if result.get(key):
            lines.append(f"({result[key]} samples {text}: one-box models are not scored on them)")
    return "\n".join(lines)


def _fmt(value, width: int) -> str:
    return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"


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


# -- average precision -------------------------------------------------------------------


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


# -- the FiftyOne evaluation method ------------------------------------------------------------


class GroundingEvaluationConfig(foud.DetectionEvaluationConfig):
    """A grounding evaluation: every sample's first predicted box against its first valid true
    box, a true positive at IoU >= ``iou`` (0.5)."""

    def __init__(self, pred_field, gt_field, iou=0.5, classwise=False, custom_metrics=None, **kwargs):
        super().__init__(pred_field, gt_field, iou=iou, classwise=classwise, custom_metrics=custom_metrics, **kwargs)

    @property
    def method(self):
        return METHOD


class GroundingEvaluation(foud.DetectionEvaluation):
    """The grounding evaluation method (see the module's docstring)."""

    def evaluate(self, doc, eval_key=None):
        """FiftyOne's per-sample hook (for ``evaluate_detections(method=...)``): the same matches
        and box attributes as the bulk path, for one sample."""
        gt_label, pred_label = doc[self.gt_field], doc[self.pred_field]
        gts = gt_label.detections if gt_label is not None else []
        if len(gts) > 1 or (doc.has_field(NO_TARGET_FIELD) and doc[NO_TARGET_FIELD]):
            return []  # one-box scoring does not apply (as in score_samples)
        gt, gt_det = None, None
        for det in gts:
            xyxy = fiftyone_xywh_to_xyxy(det.bounding_box) if det.bounding_box is not None else None
            if xyxy is not None and is_valid_xyxy(xyxy):
                gt, gt_det = xyxy, det
                break
        if gt is None:
            return []
        pred_det = pred_label.detections[0] if pred_label is not None and pred_label.detections else None
        iou = 0.0
        if pred_det is not None:
            box = fiftyone_xywh_to_xyxy(pred_det.bounding_box) if pred_det.bounding_box is not None else None
            if box is not None and is_valid_xyxy(box):
                iou = float(box_iou(np.asarray(box, dtype=np.float64), np.asarray(gt, dtype=np.float64), eps=0.0))
        status = _status(iou, pred_det is not None, self.config.iou)
        if eval_key is not None:
            doc[iou_field_of(eval_key)] = iou
            for det, value, other, match_iou in _attributes(status, gt_det, pred_det, iou):
                det[eval_key] = value
                det[f"{eval_key}_id"] = other
                det[f"{eval_key}_iou"] = match_iou
        return _matches(status, gt_det.label, gt_det.id, pred_det.label if pred_det else None,
                        pred_det.id if pred_det else None, iou, pred_det.confidence if pred_det else None)

    def register_samples(self, samples, eval_key, dynamic=True):
        super().register_samples(samples, eval_key, dynamic=dynamic)
        if eval_key is not None and not samples._dataset.has_field(iou_field_of(eval_key)):
            import fiftyone as fo

            samples._dataset.add_sample_field(iou_field_of(eval_key), fo.FloatField)

    def generate_results(self, samples, matches, eval_key=None, classes=None, missing=None, progress=None):
        return GroundingResults(samples, self.config, eval_key, matches, classes=classes, missing=missing,
                                backend=self)

    def get_fields(self, samples, eval_key, include_custom_metrics=True):
        return super().get_fields(samples, eval_key, include_custom_metrics) + [iou_field_of(eval_key)]

    def cleanup(self, samples, eval_key):
        super().cleanup(samples, eval_key)
        samples._dataset.delete_sample_fields([iou_field_of(eval_key)], error_level=1)

    # This plugin's metrics write no fields: nothing to find, rename or clean up (and no
    # operator lookup, which fails where the plugin is not installed). FiftyOne's own handling
    # runs for the other metrics of the run.
    def get_custom_metric_fields(self, samples, eval_key, metric_uris=None):
        with self._other_metrics(metric_uris):
            return super().get_custom_metric_fields(samples, eval_key)

    def rename_custom_metrics(self, samples, eval_key, new_eval_key, metric_uris=None):
        with self._other_metrics(metric_uris):
            super().rename_custom_metrics(samples, eval_key, new_eval_key)

    def cleanup_custom_metrics(self, samples, eval_key, metric_uris=None):
        with self._other_metrics(metric_uris):
            super().cleanup_custom_metrics(samples, eval_key)

    def compute_custom_metrics(self, samples, eval_key, results, metric_uris=None, scores=None):
        """This plugin's metrics (``metric_uri``) are computed here, from the scores (so they are
        there without the plugin installed); the others through FiftyOne's operators."""
        ours = [uri for uri in self._get_custom_metrics(metric_uris) if uri in METRIC_URIS]
        if ours:
            scores = scores if scores is not None else score_samples(samples, self.config.pred_field,
                                                                      self.config.gt_field)
            values = _metrics_of(scores, samples, None)["overall"]
            results.custom_metrics = dict(results.custom_metrics or {})
            for key, label, lower_is_better in METRICS:
                uri = metric_uri(key)
                if uri in ours and values.get(key) is not None:
                    results.custom_metrics[uri] = {"key": key, "value": values[key], "label": label,
                                                   "lower_is_better": lower_is_better}
        with self._other_metrics(metric_uris):
            super().compute_custom_metrics(samples, eval_key, results)

    @contextlib.contextmanager
    def _other_metrics(self, metric_uris=None):
        """The run's custom metrics, less this plugin's, while FiftyOne handles them."""
        saved = self.config.custom_metrics
        kwargs = saved if isinstance(saved, dict) else {}
        others = [uri for uri in self._get_custom_metrics(metric_uris) if uri not in METRIC_URIS]
        self.config.custom_metrics = {uri: kwargs.get(uri) for uri in others} or None
        try:
            yield
        finally:
            self.config.custom_metrics = saved


def metric_value(samples, results, key: str):
    """Metric ``key`` of ``METRICS`` or ``GREC_METRICS`` for a detection run's ``results`` on
    ``samples`` (the ``EvaluationMetric`` operators' computation), scored once per results
    object; the GREC ones count every box of a phrase of zero, one or several objects."""
    generalized = key in {k for k, _, _ in GREC_METRICS}
    attr = "_grec_metrics" if generalized else "_grounding_metrics"
    cached = getattr(results, attr, None)
    if cached is None:
        pred_field, gt_field = results.config.pred_field, results.config.gt_field
        if generalized:
            cached = evaluate_grec(samples, pred_field, gt_field, split_field=None, thresholds=(), write=False)["overall"]
        else:
            cached = _metrics_of(score_samples(samples, pred_field, gt_field), samples, None)["overall"]
        setattr(results, attr, cached)
    return cached.get(key)


def iou_field_of(eval_key: str) -> str:
    """The sample field with each sample's IoU of a grounding evaluation ``eval_key``."""
    return f"{eval_key}_iou"


PLUGIN = "@fiftyone-grounding/grounding"


def metric_uri(key: str) -> str:
    """The URI of this plugin's ``EvaluationMetric`` operator for metric ``key``."""
    return f"{PLUGIN}/{key}"


METRIC_URIS = tuple(metric_uri(key) for key, _, _ in METRICS)
GREC_METRIC_URIS = tuple(metric_uri(key) for key, _, _ in GREC_METRICS)


def _status(iou: float, has_pred: bool, threshold: float) -> str:
    if not has_pred:
        return "fn"
    return "tp" if iou >= threshold else "fp"


def _attributes(status, gt_det, pred_det, iou):
    """(label, its eval value, the id of its match, the match's IoU) as FiftyOne's COCO
    evaluation writes them: an unmatched box gets the id "" and the IoU None."""
    if status == "tp":
        return [(gt_det, "tp", pred_det.id, iou), (pred_det, "tp", gt_det.id, iou)]
    out = [(gt_det, "fn", "", None)]
    if pred_det is not None:
        out.append((pred_det, "fp", "", None))
    return out


def _matches(status, gt_label, gt_id, pred_label, pred_id, iou, confidence) -> list[tuple]:
    """FiftyOne's match tuples ``(gt label, pred label, iou, confidence, gt id, pred id)``: a true
    positive, or an unmatched prediction (with the IoU it reached, for the mAP sweep) and an
    unmatched truth."""
    if status == "tp":
        return [(gt_label, pred_label, iou, confidence, gt_id, pred_id)]
    out = [(gt_label, None, None, None, gt_id, None)]
    if pred_id is not None:
        out.insert(0, (None, pred_label, iou, confidence, None, pred_id))
    return out


class GroundingResults(foud.DetectionResults):
    """The results of a grounding evaluation: FiftyOne's detection results, plus a mAP and mAR over
    IoU 0.50:0.95 computed from each sample's own IoU and ranked by the confidence."""

    def mAP(self, classes=None):
        """COCO-style AP averaged over IoU 0.50, 0.55, ..., 0.95, one class; None when no
        prediction has a confidence to rank it by."""
        preds = self.ypred != self.missing
        confs = self.confs[preds] if self.confs is not None else np.array([])
        if not preds.any() or all(c is None or (isinstance(c, float) and np.isnan(c)) for c in confs):
            return None
        confs = np.array([-np.inf if c is None else float(c) for c in confs])
        ious = np.array([0.0 if v is None else float(v) for v in self.ious[preds]])
        truths = int((self.ytrue != self.missing).sum())
        return float(np.nanmean([average_precision(ious, confs, truths, t) for t in MAP_THRESHOLDS]))

    def mAR(self, classes=None):
        """Recall averaged over IoU 0.50:0.95 (one prediction per expression)."""
        truths = int((self.ytrue != self.missing).sum())
        if truths == 0:
            return None
        preds = self.ypred != self.missing
        ious = np.array([0.0 if v is None else float(v) for v in self.ious[preds]])
        return float(np.mean([(ious >= t).sum() / truths for t in MAP_THRESHOLDS]))

    # FiftyOne filters the results' other arrays to a subset (the panel's scenarios), not the
    # IoUs: keep them aligned, by each row's (true id, predicted id).
    def use_subset(self, subset_def):
        keys = [f"{t}|{p}" for t, p in zip(self.ytrue_ids, self.ypred_ids)]
        iou_of = dict(zip(keys, self.ious))
        self._ious_orig = self.ious
        super().use_subset(subset_def)
        self.ious = np.array([iou_of[f"{t}|{p}"] for t, p in zip(self.ytrue_ids, self.ypred_ids)], dtype=object)
        return self

    def clear_subset(self):
        if self.has_subset:
            self.ious = self._ious_orig
        super().clear_subset()


def evaluate_in_fiftyone(
    view,
    pred_field: str = "predictions",
    gt_field: str = "ground_truth",
    eval_key: str = "eval",
    split_field: Optional[str] = "split",
    scenario_fields: Sequence[str] = SCENARIO_FIELDS,
    custom_metrics: Optional[Sequence[str]] = None,
) -> dict:
    """A grounding evaluation run under ``eval_key``, visible in the App's Model Evaluation panel.

    Where the view has phrases of no or several objects (:func:`has_generalized_phrases`), the
    run is FiftyOne's COCO evaluation (``method="coco"``, mAP computed when every predicted box has a
    confidence, else ``None``) and the result also holds
    ``"grec"`` (:func:`evaluate_grec`), whose Pr@F1=1, N-acc and T-acc are the run's custom metrics.
    FiftyOne's TP/FP/FN and mAP count every stored box (a field applied with a lower
    ``score_thresh`` than 0.7 counts its low boxes there), the GREC metrics only the boxes the
    official threshold keeps.

    Writes, in bulk: ``<eval_key>`` / ``_id`` / ``_iou`` on the scored boxes, ``<eval_key>_tp``,
    ``_fp``, ``_fn`` and the sample IoU ``<eval_key>_iou`` on the scored samples. The run's
    results hold a mAP and mAR over IoU 0.50:0.95 and the grounding metrics (this plugin's
    ``EvaluationMetric`` operators, plus any ``custom_metrics`` URIs). The fields of
    ``scenario_fields`` that the view has become the panel's scenarios. The run is also
    recorded as the custom run ``eval_<eval_key>`` with the checkpoint that wrote ``pred_field``
    (``runs.py``). Returns :func:`evaluate_grounding`'s dict plus ``mAP``, ``tp``, ``fp``,
    ``fn``, ``eval_key`` and ``checkpoint``.
    """
    if has_generalized_phrases(view, gt_field):
        return _evaluate_grec_in_fiftyone(view, pred_field, gt_field, eval_key, split_field, scenario_fields,
                                          custom_metrics)
    scores = score_samples(view, pred_field, gt_field)
    config = GroundingEvaluationConfig(pred_field, gt_field, custom_metrics=list(METRIC_URIS) + list(custom_metrics or []))
    method = config.build()
    method.ensure_requirements()
    method.register_run(view, eval_key)
    method.register_samples(view, eval_key)
    matches, counts = _write_run(view, eval_key, scores, config)
    labels = sorted({v for v in scores.gt_labels + scores.pred_labels if v is not None})
    results = method.generate_results(view, matches, eval_key=eval_key, classes=labels or None, missing=MISSING)
    method.compute_custom_metrics(view, eval_key, results, scores=scores)
    method.save_run_results(view, eval_key, results)
    method.add_fields_to_sidebar_group(view, eval_key, omit_fields=(pred_field, gt_field))
    register_scenarios(view, [f for f in scenario_fields if view.has_field(f)])
    metrics = {**_metrics_of(scores, view, split_field), "iou_field": iou_field_of(eval_key)}
    out = {**metrics, "mAP": results.mAP(), "mAR": results.mAR(), **counts, "eval_key": eval_key}
    written = [iou_field_of(eval_key)] + [f"{eval_key}_{name}" for name in ("tp", "fp", "fn")]
    record_evaluation(view, eval_key, pred_field, gt_field, written,
                      {"mAP": out["mAP"], **{key: out["overall"][key] for key, _, _ in METRICS}})
    return {**out, "checkpoint": checkpoint_of(view, pred_field)}


def _evaluate_grec_in_fiftyone(view, pred_field: str, gt_field: str, eval_key: str, split_field: Optional[str],
                               scenario_fields: Sequence[str], custom_metrics) -> dict:
    """FiftyOne's COCO evaluation of the boxes, with the GREC metrics as the run's custom metrics."""
    # FiftyOne's PR curves need a confidence on every box; boxes written without one get no mAP
    scored = view.count(f"{pred_field}.detections") == view.count(f"{pred_field}.detections.confidence")
    results = view.evaluate_detections(pred_field, gt_field=gt_field, eval_key=eval_key, method="coco",
                                       compute_mAP=scored, custom_metrics=list(custom_metrics or []) or None,
                                       progress=False)
    generalized = evaluate_grec(view, pred_field, gt_field, split_field)
    results.custom_metrics = dict(results.custom_metrics or {})
    for key, label, lower_is_better in GREC_METRICS:
        value = generalized["overall"][key]
        if value is not None:
            results.custom_metrics[metric_uri(key)] = {"key": key, "value": value, "label": label,
                                                       "lower_is_better": lower_is_better}
    results.save()
    register_scenarios(view, [f for f in scenario_fields if view.has_field(f)])
    scores = score_samples(view, pred_field, gt_field)
    counts = {name: int(sum(v or 0 for v in view.values(f"{eval_key}_{name}"))) for name in ("tp", "fp", "fn")}
    mAP = results.mAP() if scored else None
    record_evaluation(view, eval_key, pred_field, gt_field, [f"{eval_key}_{name}" for name in ("tp", "fp", "fn")],
                      {"mAP": mAP, **{key: generalized["overall"][key] for key, _, _ in GREC_METRICS}})
    return {**_metrics_of(scores, view, split_field), "iou_field": None, "grec": generalized,
            "mAP": mAP, "mAR": results.mAR() if scored else None, **counts, "eval_key": eval_key,
            "checkpoint": checkpoint_of(view, pred_field)}


def _write_run(view, eval_key: str, scores: SampleScores, config: GroundingEvaluationConfig
               ) -> tuple[list, dict]:
    """Bulk-write the run's sample fields and box attributes; returns its matches and counts."""
    dataset = root_dataset(view)
    threshold = config.iou
    matches = []
    # every sample of the view gets counts, the unscored ones 0 (as FiftyOne's own loop writes)
    tp, fp, fn = ({sid: 0 for sid in scores.ids} for _ in range(3))
    box_values = {}  # label id -> (eval value, match id, match IoU)
    for i in np.flatnonzero(scores.scored):
        sid, iou = scores.ids[i], float(scores.ious[i])
        has_pred = scores.pred_ids[i] is not None
        status = _status(iou, has_pred, threshold)
        matches.extend(_matches(status, scores.gt_labels[i], scores.gt_ids[i], scores.pred_labels[i],
                                scores.pred_ids[i], iou, scores.confidences[i]))
        tp[sid], fp[sid], fn[sid] = int(status == "tp"), int(status == "fp"), int(status != "tp")
        if status == "tp":
            box_values[scores.gt_ids[i]] = ("tp", scores.pred_ids[i], iou)
            box_values[scores.pred_ids[i]] = ("tp", scores.gt_ids[i], iou)
        else:
            box_values[scores.gt_ids[i]] = ("fn", "", None)
            if has_pred:
                box_values[scores.pred_ids[i]] = ("fp", "", None)
    for name, values in (("tp", tp), ("fp", fp), ("fn", fn)):
        dataset.set_values(f"{eval_key}_{name}", values, key_field="id", validate=False)
    _write_sample_values(view, iou_field_of(eval_key), [scores.ids[i] for i in np.flatnonzero(scores.scored)],
                         [float(scores.ious[i]) for i in np.flatnonzero(scores.scored)])
    for field in (config.gt_field, config.pred_field):
        _write_box_attributes(view, field, eval_key, box_values)
    return matches, {"tp": sum(tp.values()), "fp": sum(fp.values()), "fn": sum(fn.values())}


def _write_box_attributes(view, field: str, eval_key: str, box_values: dict) -> None:
    """``<eval_key>``, ``_id`` and ``_iou`` on every box of ``field`` that the run scored: the
    field's documents read, changed and written back whole (one bulk write, not one per attribute)."""
    dataset = root_dataset(view)
    sample_ids, docs = view.values(["id", field], _raw=True)
    changed = {}
    for sid, doc in zip(sample_ids, docs):
        dets = (doc or {}).get("detections") or []
        if not any(str(det["_id"]) in box_values for det in dets):
            continue
        for det in dets:
            value, match, iou = box_values.get(str(det["_id"]), (None, None, None))
            det[eval_key], det[f"{eval_key}_id"], det[f"{eval_key}_iou"] = value, match, iou
        changed[str(sid)] = doc
    if changed:
        dataset.set_values(field, changed, key_field="id", validate=False)


def register_scenarios(view, fields: Sequence[str]) -> list[str]:
    """Make ``fields`` (sample fields such as ``split``, ``category``) scenarios of the App's Model
    Evaluation panel for the dataset, each subset one of the field's values in ``view``; an
    existing scenario of the same field is updated. Returns the scenario names."""
    from bson import ObjectId
    from fiftyone.operators.store import ExecutionStore

    if not fields:
        return []
    dataset = root_dataset(view)
    # the store and record layout of the panel's own "Create scenario" operator (FiftyOne's
    # plugins/utils/model_evaluation: store "model_evaluation_panel_builtin", key "scenarios")
    store = ExecutionStore.create("model_evaluation_panel_builtin", dataset_id(dataset))
    scenarios = dict(store.get("scenarios") or {})
    names = []
    for field in fields:
        values = sorted((v for v in view.distinct(field) if v is not None), key=str)
        if not values:
            continue
        existing = next((s for s in scenarios.values() if s.get("type") == "sample_field" and s.get("field") == field),
                        None)
        scenario_id = existing["id"] if existing else str(ObjectId())
        scenarios[scenario_id] = {"id": scenario_id, "name": field, "type": "sample_field", "field": field,
                                  "subsets": values}
        names.append(field)
    store.set("scenarios", scenarios)
    return names
