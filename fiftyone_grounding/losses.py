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


FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # the box queries' score loss (Deformable DETR's)


def grounding_loss(output, target, weights: dict[str, float]) -> dict[str, Tensor]:
    """The training loss of a ``GroundingOutput``: the box terms on its boxes, the same terms on
    every earlier refinement stage (``aux0``, ``aux1``, ...: deep supervision), and ``quality``
    where the model has a quality head, with their weighted sum under ``"loss"``.

    ``target``: (B, 4) true boxes; for a multi-box output, a list of (G_b, 4) true boxes per
    phrase (G_b may be 0), see :func:`multi_box_loss`."""
    if output.scores is not None:
        return multi_box_loss(output, target, weights)
    target_xyxy = target
    terms = box_loss(output.boxes, target_xyxy, weights)
    for k, boxes in enumerate(output.aux_boxes):
        terms[f"aux{k}"] = box_loss(boxes, target_xyxy, weights)["loss"]
        terms["loss"] = terms["loss"] + terms[f"aux{k}"]
    if output.quality is not None and weights.get("quality"):
        terms["quality"] = quality_loss(output.quality, output.boxes, target_xyxy)
        terms["loss"] = terms["loss"] + weights["quality"] * terms["quality"]
    return terms


def set_loss(boxes_xyxy: Tensor, score_logits: Tensor, truths: list[Tensor], weights: dict[str, float]) -> dict:
    """One stage of a multi-box head: queries matched to the true boxes (Hungarian, ``matching.py``),
    L1 and GIoU on the matched pairs, the focal loss of every query's score (1 where matched),
    each summed over the batch and divided by its number of true boxes (DETR)."""
    from .matching import hungarian_match

    cost = {k: weights[k] for k in ("l1", "giou", "score") if k in weights}
    matches = hungarian_match(boxes_xyxy, score_logits, truths, cost)
    rows = torch.cat([torch.full((len(q),), b, dtype=torch.long) for b, (q, _) in enumerate(matches)])
    queries = torch.cat([torch.as_tensor(q, dtype=torch.long) for q, _ in matches])
    matched_truth = torch.cat([t[torch.as_tensor(j, dtype=torch.long)] for t, (_, j) in zip(truths, matches)])
    rows, queries = rows.to(boxes_xyxy.device), queries.to(boxes_xyxy.device)
    count = max(len(rows), 1)
    pred = boxes_xyxy[rows, queries].float()
    truth = matched_truth.to(pred.device).float()
    terms = {}
    if "l1" in weights:
        terms["l1"] = F.l1_loss(box_ops.box_xyxy_to_cxcywh(pred), box_ops.box_xyxy_to_cxcywh(truth),
                                reduction="sum") / count
    if "giou" in weights:
        terms["giou"] = (1 - box_ops.generalized_box_iou(pred, truth)).sum() / count
    labels = torch.zeros_like(score_logits, dtype=torch.float32)
    labels[rows, queries] = 1.0
    logits = score_logits.float()
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p_t = p * labels + (1 - p) * (1 - labels)
    alpha_t = FOCAL_ALPHA * labels + (1 - FOCAL_ALPHA) * (1 - labels)
    terms["score"] = (alpha_t * (1 - p_t) ** FOCAL_GAMMA * ce).sum() / count
    terms["loss"] = sum(weights[k] * terms[k] for k in ("l1", "giou", "score") if k in terms)
    return terms


def multi_box_loss(output, truths: list[Tensor], weights: dict[str, float]) -> dict[str, Tensor]:
    """The loss of a multi-box output: :func:`set_loss` on the last decoder layer (its terms
    ``l1``, ``giou``, ``score``) and on every earlier one (``aux0``, ...), and ``exist``, the BCE of
    the phrase's existence score (1 where it has a true box); their weighted sum under ``"loss"``.
    ``truths`` may also be a (B, 4) tensor of one box per phrase (a NaN row: none)."""
    if torch.is_tensor(truths):
        truths = [row[None] if torch.isfinite(row).all() else row.new_zeros(0, 4) for row in truths]
    terms = set_loss(output.query_boxes, output.scores, truths, weights)
    for k, (boxes, scores) in enumerate(zip(output.aux_boxes, output.aux_scores)):
        terms[f"aux{k}"] = set_loss(boxes, scores, truths, weights)["loss"]
        terms["loss"] = terms["loss"] + terms[f"aux{k}"]
    present = torch.tensor([float(len(t) > 0) for t in truths], device=output.exists.device)
    terms["exist"] = F.binary_cross_entropy_with_logits(output.exists.float(), present)
    terms["loss"] = terms["loss"] + weights["exist"] * terms["exist"]
    return terms
