"""What training measures on a batch besides the loss: the IoU with each phrase's first true box,
and for multi-box models the phrases gRefCOCO's scorer counts right and the queries it matches."""

from __future__ import annotations

import torch

from ..models.boxes import box_iou, generalized_box_iou


def iou_with_first_box(pred: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU sum, count) of each phrase's predicted box with its first true box, over the phrases
    that have one (a no-target phrase's first box is NaN)."""
    has = torch.isfinite(boxes).all(-1)
    iou = box_iou(pred.float(), torch.nan_to_num(boxes.float()))
    return (iou * has).sum(), has.sum()


def grec_right(out, truths, score_thresh: float) -> int:
    """How many phrases of a multi-box output (boxes clipped) gRefCOCO's scorer counts right: at
    confidence ``score_thresh``, every true box found at GIoU >= 0.5 and nothing else kept (a
    phrase of nothing: no box kept)."""
    from ..evaluation import grec
    boxes = out.query_boxes.float().cpu().numpy()
    scores = out.box_confidences().float().cpu().numpy()
    return sum(grec.score_expression(grec.Expression.of(b, c, t.float().cpu().numpy()), score_thresh).correct
               for b, c, t in zip(boxes, scores, truths))


def matched_queries(query_boxes: torch.Tensor, truths) -> torch.Tensor:
    """(B, Q) 1.0 where a query's box is matched to one of its phrase's true boxes as gRefCOCO's
    scorer matches (``grec.greedy_matches``: GIoU >= 0.5, each box once), else 0.0: what a
    multi-box model's confidence is calibrated to."""
    from ..evaluation.grec import greedy_matches

    flags = torch.zeros(query_boxes.shape[:2])
    for b, truth in enumerate(truths):
        if len(truth):
            boxes = query_boxes[b].detach().float().cpu()
            giou = generalized_box_iou(boxes[:, None], truth.float().cpu()[None]).numpy()  # (Q, n)
            for i, _ in greedy_matches(giou):
                flags[b, i] = 1.0
    return flags
