"""Box formats and overlap measures, as pure functions.

Every box conversion of the project lives here, like detr's ``util/box_ops.py``.
Functions take torch tensors or numpy arrays of any leading shape with the 4 coordinates
in the last dimension, and return the same kind (torch is imported only for tensors, so the
evaluation runs without it). Formats:

- ``xyxy``: (x_min, y_min, x_max, y_max)
- ``cxcywh``: (center x, center y, width, height)
- ``xywh``: (x_min, y_min, width, height), FiftyOne's ``Detection.bounding_box``
  when relative to the image size

Normalized boxes are in [0, 1] image units; pixel boxes are in pixels.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

if TYPE_CHECKING:
    import torch

Boxes = Union["torch.Tensor", np.ndarray]


def _xp(boxes):
    """The array module of ``boxes``: torch for tensors, numpy otherwise."""
    if type(boxes).__module__.startswith("torch"):
        import torch

        return torch
    return np


def _parts(boxes: Boxes):
    return [boxes[..., i] for i in range(4)]


def _scale(boxes: Boxes, width: float, height: float) -> Boxes:
    values = [width, height, width, height]
    return boxes.new_tensor(values) if _xp(boxes) is not np else np.asarray(values, dtype=boxes.dtype)


def box_cxcywh_to_xyxy(boxes: Boxes) -> Boxes:
    cx, cy, w, h = _parts(boxes)
    return _xp(boxes).stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(boxes: Boxes) -> Boxes:
    x0, y0, x1, y1 = _parts(boxes)
    return _xp(boxes).stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_xywh_to_xyxy(boxes: Boxes) -> Boxes:
    x, y, w, h = _parts(boxes)
    return _xp(boxes).stack([x, y, x + w, y + h], -1)


def box_xyxy_abs_to_rel(boxes: Boxes, width: float, height: float) -> Boxes:
    """Pixel xyxy -> normalized xyxy."""
    return boxes / _scale(boxes, width, height)


def box_xyxy_rel_to_abs(boxes: Boxes, width: float, height: float) -> Boxes:
    """Normalized xyxy -> pixel xyxy."""
    return boxes * _scale(boxes, width, height)


def clip_to_image(boxes: Boxes) -> Boxes:
    """Normalized boxes clipped to the image, [0, 1]: the post-processing of a model's boxes
    (the losses see them unclipped, as DETR's)."""
    return boxes.clip(0.0, 1.0)


def clip_box_to_image(box: Sequence[float]) -> list[float]:
    """One normalized box (a list, tuple or array row of 4 numbers) clipped to the image, [0, 1], as
    a list of floats: the part of a box partly outside the image (:func:`clip_to_image` on a list; in
    plain Python, as it runs for every box that a bulk write or a record read makes)."""
    return [min(max(float(v), 0.0), 1.0) for v in box]


def fiftyone_xywh_to_xyxy(bounding_box: Sequence[float]) -> list[float]:
    """FiftyOne ``Detection.bounding_box`` (relative x, y, w, h) -> relative xyxy list."""
    x, y, w, h = (float(v) for v in bounding_box)
    return [x, y, x + w, y + h]


def xyxy_to_fiftyone_xywh(box: Sequence[float]) -> list[float]:
    """Relative xyxy -> FiftyOne ``Detection.bounding_box`` (relative x, y, w, h)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def is_valid_xyxy(box: Sequence[float]) -> bool:
    """True for a finite box with positive width and height."""
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        return False
    x0, y0, x1, y1 = (float(v) for v in box)
    return x1 > x0 and y1 > y0


def box_area(boxes: Boxes) -> Boxes:
    return (boxes[..., 2] - boxes[..., 0]).clip(min=0) * (boxes[..., 3] - boxes[..., 1]).clip(min=0)


def _inter_union(a: Boxes, b: Boxes) -> tuple:
    xp = _xp(a)
    lt = xp.maximum(a[..., :2], b[..., :2])
    rb = xp.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clip(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _enclosing(a: Boxes, b: Boxes) -> tuple:
    xp = _xp(a)
    lt = xp.minimum(a[..., :2], b[..., :2])
    rb = xp.maximum(a[..., 2:], b[..., 2:])
    return lt, rb


def box_iou(a: Boxes, b: Boxes, eps: float = 1e-7) -> Boxes:
    """Element-wise IoU of xyxy boxes ``a`` and ``b`` (same shape, ``(..., 4)``)."""
    inter, union = _inter_union(a, b)
    return inter / (union + eps)


def generalized_box_iou(a: Boxes, b: Boxes, eps: float = 1e-7) -> Boxes:
    """Element-wise GIoU of xyxy boxes."""
    inter, union = _inter_union(a, b)
    iou = inter / (union + eps)
    lt, rb = _enclosing(a, b)
    wh = (rb - lt).clip(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + eps)


def distance_box_iou(a: Boxes, b: Boxes, eps: float = 1e-7) -> Boxes:
    """Element-wise DIoU of xyxy boxes: IoU minus normalized center distance."""
    inter, union = _inter_union(a, b)
    iou = inter / (union + eps)
    lt, rb = _enclosing(a, b)
    diag = ((rb - lt) ** 2).sum(-1)
    ca = (a[..., :2] + a[..., 2:]) / 2
    cb = (b[..., :2] + b[..., 2:]) / 2
    dist = ((ca - cb) ** 2).sum(-1)
    return iou - dist / (diag + eps)
