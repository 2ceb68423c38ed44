"""Training losses: named terms with their weights in one place (detr's ``SetCriterion``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import boxes as box_ops


def box_loss(pred_xyxy: Tensor, target_xyxy: Tensor, weights: dict[str, float]) -> dict[str, Tensor]:
    """Named loss terms (mean over the batch) and their weighted sum under ``"loss"``.

    Terms: ``l1`` on (cx, cy, w, h), ``giou`` = 1 - GIoU, ``diou`` = 1 - DIoU.
    """
    pred_xyxy = pred_xyxy.float()
    target_xyxy = target_xyxy.float()
    terms: dict[str, Tensor] = {}
    if "l1" in weights:
        terms["l1"] = F.l1_loss(box_ops.box_xyxy_to_cxcywh(pred_xyxy), box_ops.box_xyxy_to_cxcywh(target_xyxy))
    if "giou" in weights:
        terms["giou"] = (1 - box_ops.generalized_box_iou(pred_xyxy, target_xyxy)).mean()
    if "diou" in weights:
        terms["diou"] = (1 - box_ops.distance_box_iou(pred_xyxy, target_xyxy)).mean()
    terms["loss"] = sum(weights[k] * terms[k] for k in weights)
    return terms
