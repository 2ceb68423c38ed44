"""Training losses: named terms with their weights in one place (detr's ``SetCriterion``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import boxes as box_ops
from .config import BOX_LOSS_TERMS


def box_loss(pred_xyxy: Tensor, target_xyxy: Tensor, weights: dict[str, float],
             present: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Named box loss terms and their weighted sum under ``"loss"``, normalised as DETR's
    ``SetCriterion.loss_boxes``: each term summed over the boxes and divided by their number;
    ``l1`` sums the 4 (cx, cy, w, h) coordinates of a box (not their mean: with the mean, an ``l1``
    weight of 5 would train as 1.25). Terms: ``l1``, ``giou`` = 1 - GIoU, ``diou`` = 1 - DIoU;
    weights of other terms (``quality``) are ignored here. The boxes are the model's own, nothing
    clamped: a corner predicted outside the image still gets its gradient (DETR clamps only in
    post-processing). ``present`` (B,) bool: the rows that count (the others, phrases shown with an
    image that lacks their referent, have no true box); the count is kept on the device."""
    pred_xyxy = pred_xyxy.float()
    target_xyxy = target_xyxy.float()
    if present is None:
        keep, num_boxes = None, max(pred_xyxy.shape[0], 1)
    else:  # rows without a box compare with themselves (finite, zero), then weigh nothing
        keep, num_boxes = present.float(), present.float().sum().clamp(min=1.0)
        target_xyxy = torch.where(present[:, None], target_xyxy, pred_xyxy.detach())

    def mean_over_boxes(per_box: Tensor) -> Tensor:  # (B,) -> ()
        return (per_box if keep is None else per_box * keep).sum() / num_boxes

    terms: dict[str, Tensor] = {}
    if "l1" in weights:
        l1 = F.l1_loss(box_ops.box_xyxy_to_cxcywh(pred_xyxy), box_ops.box_xyxy_to_cxcywh(target_xyxy),
                       reduction="none")  # (B, 4)
        terms["l1"] = mean_over_boxes(l1.sum(-1))
    if "giou" in weights:
        terms["giou"] = mean_over_boxes(1 - box_ops.generalized_box_iou(pred_xyxy, target_xyxy))
    if "diou" in weights:
        terms["diou"] = mean_over_boxes(1 - box_ops.distance_box_iou(pred_xyxy, target_xyxy))
    terms["loss"] = sum(weights[k] * terms[k] for k in BOX_LOSS_TERMS if k in weights)
    return terms


def quality_loss(quality_logits: Tensor, pred_xyxy: Tensor, target_xyxy: Tensor,
                 absent: Optional[Tensor] = None) -> Tensor:
    """Binary cross-entropy of the quality head's logits against each box's IoU with its target,
    a soft label in [0, 1]: the IoU of the box as post-processing writes it (clipped to the
    image), computed from detached boxes (the quality head learns to judge the box, and this loss
    never moves it). ``absent`` (B,) bool: phrases shown with an image that lacks their referent,
    whose label is 0 (no box there is right)."""
    with torch.no_grad():
        target = torch.nan_to_num(target_xyxy.float())
        iou = box_ops.box_iou(box_ops.clip_to_image(pred_xyxy.detach().float()), target).clamp(0.0, 1.0)  # (B,)
        if absent is not None:
            iou = iou.masked_fill(absent, 0.0)
    return F.binary_cross_entropy_with_logits(quality_logits.float(), iou)


JUDGED_PER_PHRASE = 4  # two jittered true boxes, another phrase's box, a random box


def judge_boxes(target_xyxy: Tensor, image_index: Tensor, rng) -> Tensor:
    """(B, K=4, 4) other boxes for the quality head to judge per phrase (``rng``: a numpy
    Generator; the boxes are made on the CPU): the true box twice jittered, its centre moved by
    up to 60% of its size and each side scaled by up to 2x either way (IoU-Net, Jiang et al. 2018,
    trains its IoU predictor on jittered true boxes; here from near 1 down to 0), the true box of
    another phrase of the same image where there is one (another object), else of the batch, and
    a random box. A phrase without a true box (NaN row) gets random boxes only."""
    import numpy as np

    target = target_xyxy.detach().float().cpu().numpy()
    b = target.shape[0]
    present = np.isfinite(target).all(1)
    cx, cy = (target[:, 0] + target[:, 2]) / 2, (target[:, 1] + target[:, 3]) / 2
    w, h = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]

    def random_boxes(n):
        c, size = rng.uniform(0.1, 0.9, (n, 2)), rng.uniform(0.05, 0.6, (n, 2))
        return np.concatenate([c - size / 2, c + size / 2], 1)

    def jittered():
        reach = rng.uniform(0, 0.6, (b, 1))
        shift = rng.uniform(-1, 1, (b, 2)) * reach
        scale = np.exp(rng.uniform(-1, 1, (b, 2)) * rng.uniform(0, np.log(2), (b, 1)))
        ncx, ncy = cx + shift[:, 0] * w, cy + shift[:, 1] * h
        nw, nh = w * scale[:, 0], h * scale[:, 1]
        return np.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2], 1)

    # each phrase's other box: a random present phrase of its image, else of the batch (every step:
    # (B, B) masks, no loop over the phrases)
    images, rows = image_index.cpu().numpy(), np.arange(b)
    candidate = present[None, :] & (rows[:, None] != rows[None, :])  # (B, B)
    same = candidate & (images[:, None] == images[None, :])
    pool = np.where(same.any(1)[:, None], same, candidate)
    sizes = pool.sum(1)
    pick = np.zeros(b, dtype=np.int64)
    pick[sizes > 0] = rng.integers(sizes[sizes > 0])  # the pick's rank in the row's pool
    other = np.where(sizes > 0, np.argmax(pool & (np.cumsum(pool, 1) - 1 == pick[:, None]), 1), rows)
    others = np.where(present[other, None], target[other], random_boxes(b))
    boxes = np.stack([jittered(), jittered(), others, random_boxes(b)], 1)  # (B, K, 4)
    boxes[~present] = random_boxes(int((~present).sum()) * JUDGED_PER_PHRASE).reshape(-1, JUDGED_PER_PHRASE, 4)
    boxes = np.clip(np.nan_to_num(boxes, nan=0.5), 0.0, 1.0)
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 1e-3)
    return torch.from_numpy(boxes.astype(np.float32))


def judge_loss(judged_logits: Tensor, boxes_xyxy: Tensor, target_xyxy: Tensor) -> Tensor:
    """BCE of the quality head's logits at other boxes (B, K) against each box's IoU with the
    phrase's true box (B, 4; a NaN row, no true box: 0), as :func:`quality_loss` for its own box."""
    with torch.no_grad():
        target = target_xyxy.float()
        present = torch.isfinite(target).all(-1)  # (B,)
        iou = box_ops.box_iou(boxes_xyxy.float(), torch.nan_to_num(target)[:, None]).clamp(0.0, 1.0)  # (B, K)
        iou = iou * present[:, None]
    return F.binary_cross_entropy_with_logits(judged_logits.float(), iou)


FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # the box queries' score loss (Deformable DETR's)


def grounding_loss(output, target, weights: dict[str, float], absent: Optional[Tensor] = None) -> dict[str, Tensor]:
    """The training loss of a ``GroundingOutput``: the box terms on its boxes, the same terms on
    every earlier refinement stage (``aux0``, ``aux1``, ...: deep supervision), and ``quality``
    where the model has a quality head, with their weighted sum under ``"loss"``.

    ``target``: (B, 4) true boxes; for a multi-box output, a list of (G_b, 4) true boxes per
    phrase (G_b may be 0), see :func:`multi_box_loss`. ``absent`` (B,) bool, one-box outputs:
    phrases shown with an image that lacks their referent (their target row is NaN): no box
    loss, the quality head learns that no box there is right, and the presence head (``exist``,
    where the model has one) that the object is not there."""
    if output.scores is not None:
        return multi_box_loss(output, target, weights)
    present = None if absent is None else ~absent
    terms = box_loss(output.boxes, target, weights, present)
    for k, boxes in enumerate(output.aux_boxes):
        terms[f"aux{k}"] = box_loss(boxes, target, weights, present)["loss"]
        terms["loss"] = terms["loss"] + terms[f"aux{k}"]
    if output.quality is not None and weights.get("quality"):
        terms["quality"] = quality_loss(output.quality, output.boxes, target, absent)
        terms["loss"] = terms["loss"] + weights["quality"] * terms["quality"]
    if output.judged is not None and weights.get("judge"):
        terms["judge"] = judge_loss(output.judged, output.judge_boxes, target)
        terms["loss"] = terms["loss"] + weights["judge"] * terms["judge"]
    if output.exists is not None and weights.get("exist"):  # the presence head: 1 where the referent is here
        present = torch.ones_like(output.exists) if absent is None else (~absent).float()
        terms["exist"] = F.binary_cross_entropy_with_logits(output.exists.float(), present)
        terms["loss"] = terms["loss"] + weights["exist"] * terms["exist"]
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
