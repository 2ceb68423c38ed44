"""Box conversions round-trip; IoU/GIoU/DIoU agree with torchvision."""

import math

import pytest
import torch
import torchvision.ops as tvo

from fiftyone_grounding.models import boxes as B
def random_xyxy(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 0.7
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.01
    return torch.cat([xy, xy + wh], dim=1).double()


def test_conversions_round_trip():
    b = random_xyxy(100)
    assert torch.allclose(B.box_cxcywh_to_xyxy(B.box_xyxy_to_cxcywh(b)), b)
    assert torch.allclose(B.box_xywh_to_xyxy(torch.cat([b[:, :2], b[:, 2:] - b[:, :2]], 1)), b)
    assert torch.allclose(B.box_xyxy_rel_to_abs(B.box_xyxy_abs_to_rel(b * 500, 640, 480), 640, 480), b * 500)


def test_conversions_any_leading_shape():
    b = random_xyxy(24).reshape(2, 3, 4, 4)
    assert B.box_xyxy_to_cxcywh(b).shape == (2, 3, 4, 4)
    assert torch.allclose(B.box_cxcywh_to_xyxy(B.box_xyxy_to_cxcywh(b)), b)


def test_fiftyone_round_trip():
    for box in random_xyxy(50).tolist():
        fo_box = B.xyxy_to_fiftyone_xywh(box)
        assert B.fiftyone_xywh_to_xyxy(fo_box) == pytest.approx(box, abs=1e-12)


def test_iou_matches_torchvision():
    a, b = random_xyxy(200, 1), random_xyxy(200, 2)
    ours = B.box_iou(a, b, eps=0)
    ref = tvo.box_iou(a, b).diagonal()
    assert torch.allclose(ours, ref, atol=1e-9)


def test_giou_diou_match_torchvision():
    a, b = random_xyxy(200, 3), random_xyxy(200, 4)
    assert torch.allclose(B.generalized_box_iou(a, b, eps=0), tvo.generalized_box_iou(a, b).diagonal(), atol=1e-9)
    assert torch.allclose(B.distance_box_iou(a, b, eps=0), tvo.distance_box_iou(a, b).diagonal(), atol=1e-7)


def test_identical_and_disjoint():
    a = torch.tensor([[0.1, 0.1, 0.4, 0.5]])
    assert B.box_iou(a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert B.distance_box_iou(a, a).item() == pytest.approx(1.0, abs=1e-6)
    far = torch.tensor([[0.6, 0.6, 0.9, 0.9]])
    assert B.box_iou(a, far).item() == 0.0
    assert B.generalized_box_iou(a, far).item() < 0


def test_validity():
    assert B.is_valid_xyxy([0, 0, 1, 1])
    assert not B.is_valid_xyxy([0.5, 0, 0.5, 1])
    assert not B.is_valid_xyxy([0.6, 0, 0.5, 1])
    assert not B.is_valid_xyxy([0, math.nan, 1, 1])
