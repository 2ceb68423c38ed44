"""Hungarian matching of box queries to a phrase's true boxes (DETR's ``HungarianMatcher``).

For each phrase, the cost of giving query ``i`` the true box ``j`` is
``l1 * |box_i - truth_j|_1 (cx, cy, w, h) - giou * GIoU(box_i, truth_j) - score * p_i``
(``p_i``: the query's probability of holding a referred object); ``scipy``'s
``linear_sum_assignment`` finds the assignment of least total cost, each true box to one query.
A phrase with no true box matches no query.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from . import boxes as box_ops


@torch.no_grad()
def match_cost(boxes_xyxy: Tensor, score_logits: Tensor, truths_xyxy: Tensor, weights: dict[str, float]) -> Tensor:
    """(Q, 4) boxes, (Q,) score logits, (G, 4) true boxes -> (Q, G) costs."""
    boxes_xyxy, truths_xyxy = boxes_xyxy.float(), truths_xyxy.float()
    l1 = torch.cdist(box_ops.box_xyxy_to_cxcywh(boxes_xyxy), box_ops.box_xyxy_to_cxcywh(truths_xyxy), p=1)
    giou = box_ops.generalized_box_iou(boxes_xyxy[:, None, :], truths_xyxy[None, :, :])
    score = score_logits.float().sigmoid()[:, None]
    return weights.get("l1", 0.0) * l1 - weights.get("giou", 0.0) * giou - weights.get("score", 0.0) * score


def hungarian_match(boxes_xyxy: Tensor, score_logits: Tensor, truths: Sequence[Tensor],
                    weights: dict[str, float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each phrase b: (query indices, truth indices) of its least-cost assignment.

    boxes_xyxy (B, Q, 4), score_logits (B, Q), ``truths[b]`` (G_b, 4) with G_b <= Q."""
    out = []
    for b, truth in enumerate(truths):
        if len(truth) == 0:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.int64)))
            continue
        cost = match_cost(boxes_xyxy[b], score_logits[b], truth, weights).cpu().numpy()
        rows, cols = linear_sum_assignment(cost)
        out.append((rows.astype(np.int64), cols.astype(np.int64)))
    return out
