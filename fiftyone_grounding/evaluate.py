"""Grounding metrics (mIoU, Acc@0.5, Acc@0.75; overall and per split) on FiftyOne views."""

from __future__ import annotations

from typing import Optional

import torch

from .boxes import box_iou, fiftyone_xywh_to_xyxy, is_valid_xyxy
from .errors import InputError

THRESHOLDS = (0.5, 0.75)


def grounding_metrics(ious) -> dict:
    """mIoU, Acc@0.5 and Acc@0.75 of per-expression IoUs (a missing prediction counts as 0)."""
    ious = torch.as_tensor(ious, dtype=torch.float64)
    if ious.numel() == 0:
        return {"miou": float("nan"), "acc50": float("nan"), "acc75": float("nan"), "count": 0}
    return {
        "miou": ious.mean().item(),
        "acc50": (ious >= 0.5).double().mean().item(),
        "acc75": (ious >= 0.75).double().mean().item(),
        "count": int(ious.numel()),
    }


def _first_boxes(values) -> list[Optional[list[float]]]:
    """First relative xyxy box of each sample's Detections.bounding_box list, or None where
    there is none or it is not a box (non-finite, zero or negative size)."""
    out = []
    for boxes in values:
        box = boxes[0] if boxes else None
        box = fiftyone_xywh_to_xyxy(box) if box is not None and len(box) == 4 else None
        out.append(box if box is not None and is_valid_xyxy(box) else None)
    return out


def sample_ious(view, pred_field: str, gt_field: str) -> tuple[list[str], list[Optional[float]]]:
    """Per-sample IoU between the first predicted and first ground-truth box.

    None where the sample has no valid ground-truth box; 0.0 where it has no prediction.
    """
    ids, preds, gts = view.values(
        ["id", f"{pred_field}.detections.bounding_box", f"{gt_field}.detections.bounding_box"])
    preds, gts = _first_boxes(preds), _first_boxes(gts)
    ious: list[Optional[float]] = [None] * len(ids)
    pairs = [(i, p, g) for i, (p, g) in enumerate(zip(preds, gts)) if g is not None]
    with_pred = [(i, p, g) for i, p, g in pairs if p is not None]
    for i, p, g in pairs:
        ious[i] = 0.0
    if with_pred:
        p = torch.tensor([x[1] for x in with_pred], dtype=torch.float64)
        g = torch.tensor([x[2] for x in with_pred], dtype=torch.float64)
        for (i, _, _), v in zip(with_pred, box_iou(p, g, eps=0.0).tolist()):
            ious[i] = v
    return ids, ious


def evaluate_grounding(
    view,
    pred_field: str = "predictions",
    gt_field: str = "ground_truth",
    split_field: Optional[str] = "split",
    iou_field: Optional[str] = None,
    print_table: bool = True,
) -> dict:
    """Score predictions against ground truth and store a per-sample IoU field.

    Returns ``{"overall": {miou, acc50, acc75, count}, "splits": {name: {...}},
    "missing_predictions": n, "unscored": n, "iou_field": name}``; ``unscored`` samples have no
    valid ground-truth box (none, non-finite, zero or negative size). The IoU goes to ``iou_field``
    (default ``"<pred_field>_iou"``) so the App can sort and filter by it.
    """
    for name in (pred_field, gt_field):
        if not view.has_field(name):
            raise InputError(f"The dataset has no field {name!r}; its fields: {sorted(view.get_field_schema())}")
    iou_field = iou_field or f"{pred_field}_iou"
    ids, ious = sample_ious(view, pred_field, gt_field)
    has_pred = view.values(f"{pred_field}.detections")
    missing = sum(1 for d, v in zip(has_pred, ious) if v is not None and not d)
    view.set_values(iou_field, ious)

    scored = [v for v in ious if v is not None]
    result = {"overall": grounding_metrics(scored), "splits": {}, "missing_predictions": missing,
              "unscored": len(ious) - len(scored), "iou_field": iou_field}
    if split_field and view.has_field(split_field):
        splits = view.values(split_field)
        for name in sorted({s for s in splits if s is not None}, key=str):
            result["splits"][name] = grounding_metrics(
                [v for v, s in zip(ious, splits) if s == name and v is not None])
    if print_table:
        print(format_table(result))
    return result


def format_table(result: dict) -> str:
    rows = [(name, m) for name, m in result["splits"].items()] + [("overall", result["overall"])]
    lines = [f"{'split':<10} | {'count':>6} | {'mIoU':>6} | {'Acc@0.5':>7} | {'Acc@0.75':>8}",
             "-" * 50]
    for name, m in rows:
        lines.append(f"{name:<10} | {m['count']:>6} | {m['miou']:>6.4f} | {m['acc50']:>7.4f} | {m['acc75']:>8.4f}")
    if result.get("missing_predictions"):
        lines.append(f"({result['missing_predictions']} samples had no prediction and count as IoU 0)")
    if result.get("unscored"):
        lines.append(f"({result['unscored']} samples have no valid ground-truth box and are not scored)")
    return "\n".join(lines)


def mean_box(view, gt_field: str = "ground_truth") -> list[float]:
    """Mean ground-truth box (relative xyxy) of a view."""
    boxes = [b for b in _first_boxes(view.values(f"{gt_field}.detections.bounding_box")) if b is not None]
    if not boxes:
        raise InputError("No ground-truth boxes to average: the view has no valid box")
    return torch.tensor(boxes, dtype=torch.float64).mean(0).tolist()


def constant_box_miou(train_view, test_view, gt_field: str = "ground_truth") -> float:
    """Test mIoU of always predicting the mean training box: the floor a model must beat."""
    box = mean_box(train_view, gt_field)
    gts = [b for b in _first_boxes(test_view.values(f"{gt_field}.detections.bounding_box")) if b is not None]
    g = torch.tensor(gts, dtype=torch.float64)
    p = torch.tensor(box, dtype=torch.float64).expand_as(g)
    return box_iou(p, g, eps=0.0).mean().item()


# Grounding metrics shown beside FiftyOne's own in the App's Model Evaluation panel.
PANEL_METRICS = (("miou", "mIoU"), ("acc50", "Acc@0.5"), ("acc75", "Acc@0.75"))


def evaluate_in_fiftyone(
    view,
    pred_field: str = "predictions",
    gt_field: str = "ground_truth",
    eval_key: str = "eval",
    split_field: Optional[str] = "split",
    iou_field: Optional[str] = None,
) -> dict:
    """FiftyOne's detection evaluation plus the grounding metrics, visible in the App.

    Runs ``evaluate_detections`` (COCO-style matching at IoU 0.5, with mAP) under
    ``eval_key``, so the App's Model Evaluation panel lists the run; stores mIoU,
    Acc@0.5 and Acc@0.75 on it as custom metrics; writes each sample's IoU to
    ``iou_field`` (default ``"<eval_key>_iou"``) to sort and filter by. Returns
    :func:`evaluate_grounding`'s dict plus ``mAP``, ``tp``, ``fp``, ``fn`` and ``eval_key``.
    Samples without a valid ground-truth box are left out of both, as ``unscored``.
    """
    metrics = evaluate_grounding(view, pred_field, gt_field, split_field=split_field,
                                 iou_field=iou_field or f"{eval_key}_iou", print_table=False)
    # FiftyOne's matcher fails on boxes of negative size or NaN: evaluate the scored samples only.
    scored = view.exists(metrics["iou_field"])
    results = scored.evaluate_detections(pred_field, gt_field=gt_field, eval_key=eval_key, compute_mAP=True)
    results.custom_metrics = {
        f"fiftyone-grounding/{key}": {"key": key, "value": metrics["overall"][key], "label": label,
                                      "lower_is_better": False}
        for key, label in PANEL_METRICS
    }
    results.save()
    counts = {k: int(view.sum(f"{eval_key}_{k}")) for k in ("tp", "fp", "fn")}
    return {**metrics, "mAP": results.mAP(), **counts, "eval_key": eval_key}
