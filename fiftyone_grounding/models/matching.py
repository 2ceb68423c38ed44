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

    boxes_xyxy (B, Q, 4), score_logits (B, Q), ``truths[b]`` (G_b, 4) with G_b <= Q. The costs of
    the whole batch are computed at once on the device and read once (DETR's way)."""
    sizes = [len(t) for t in truths]
    if not sum(sizes):
        return [(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in truths]
    batch, queries = score_logits.shape
    everything = torch.cat([t.to(boxes_xyxy.device) for t in truths])  # (sum G, 4)
    cost = match_cost(boxes_xyxy.reshape(-1, 4), score_logits.reshape(-1), everything, weights)
    cost = cost.view(batch, queries, -1).cpu().numpy()  # (B, Q, sum G)
    out, start = [], 0
    for b, size in enumerate(sizes):
        rows, cols = linear_sum_assignment(cost[b, :, start:start + size]) if size else ([], [])
        out.append((np.asarray(rows, np.int64), np.asarray(cols, np.int64)))
        start += size
    return out
