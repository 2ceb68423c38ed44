"""Training losses: named terms with their weights in one place (detr's ``SetCriterion``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import boxes as box_ops
from .config import BOX_LOSS_TERMS


def box_loss(pred_xyxy: Tensor, target_xyxy: Tensor, weights: dict[str, float]) -> dict[str, Tensor]:
    """Named box loss terms (mean over the batch) and their weighted sum under ``"loss"``.

    Terms: ``l1`` on (cx, cy, w, h), ``giou`` = 1 - GIoU, ``diou`` = 1 - DIoU; weights of other
    terms (``quality``) are ignored here.
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
    terms["loss"] = sum(weights[k] * terms[k] for k in BOX_LOSS_TERMS if k in weights)
    return terms


def quality_loss(quality_logits: Tensor, pred_xyxy: Tensor, target_xyxy: Tensor) -> Tensor:
    """Binary cross-entropy of the quality head's logits against each box's IoU with its target,
    a soft label in [0, 1]. The IoU is computed from detached boxes: the quality head learns to
    judge the box, and this loss never moves the box."""
    with torch.no_grad():
        iou = box_ops.box_iou(pred_xyxy.detach().float(), target_xyxy.float()).clamp(0.0, 1.0)  # (B,)
    return F.binary_cross_entropy_with_logits(quality_logits.float(), iou)


def grounding_loss(output, target_xyxy: Tensor, weights: dict[str, float]) -> dict[str, Tensor]:
    """The training loss of a ``GroundingOutput``: the box terms on its boxes, the same terms on
    every earlier refinement stage (``aux0``, ``aux1``, ...: deep supervision), and ``quality``
    where the model has a quality head, with their weighted sum under ``"loss"``."""
    terms = box_loss(output.boxes, target_xyxy, weights)
    for k, boxes in enumerate(output.aux_boxes):
        terms[f"aux{k}"] = box_loss(boxes, target_xyxy, weights)["loss"]
        terms["loss"] = terms["loss"] + terms[f"aux{k}"]
    if output.quality is not None and weights.get("quality"):
        terms["quality"] = quality_loss(output.quality, output.boxes, target_xyxy)
        terms["loss"] = terms["loss"] + weights["quality"] * terms["quality"]
    return terms
