"""The losses against the formulas they cite: DETR's ``SetCriterion.loss_boxes`` (L1 summed over a
box's 4 coordinates and GIoU, each divided by the number of boxes), nothing clamped before the
loss; phrases shown with an image that lacks their referent train the confidence only."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou as torchvision_box_iou
from torchvision.ops import generalized_box_iou as torchvision_giou

from fiftyone_grounding.models.base import GroundingOutput
from fiftyone_grounding.models.boxes import box_cxcywh_to_xyxy
from fiftyone_grounding.models.losses import box_loss, grounding_loss, quality_loss, set_loss

WEIGHTS = {"l1": 5.0, "giou": 2.0}
# (cx, cy, w, h) predictions, one reaching past the left and top borders, and their targets
SRC = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.05, 0.1, 0.3, 0.4], [0.7, 0.6, 0.2, 0.5]])
TGT = torch.tensor([[0.45, 0.55, 0.3, 0.3], [0.15, 0.2, 0.3, 0.4], [0.7, 0.65, 0.25, 0.4]])


def detr_loss_boxes(src_cxcywh, tgt_cxcywh, num_boxes):
    """DETR's ``SetCriterion.loss_boxes`` (models/detr.py), written out: L1 on (cx, cy, w, h)
    with reduction none, summed, over the number of boxes; 1 - the diagonal of the GIoU matrix
    (torchvision's, the same function as detr's util/box_ops.py), summed, over the number of boxes."""
    loss_bbox = F.l1_loss(src_cxcywh, tgt_cxcywh, reduction="none")
    giou = torch.diag(torchvision_giou(box_cxcywh_to_xyxy(src_cxcywh), box_cxcywh_to_xyxy(tgt_cxcywh)))
    return {"l1": loss_bbox.sum() / num_boxes, "giou": (1 - giou).sum() / num_boxes}


def test_box_loss_is_detrs_loss_boxes():
    terms = box_loss(box_cxcywh_to_xyxy(SRC), box_cxcywh_to_xyxy(TGT), WEIGHTS)
    reference = detr_loss_boxes(SRC, TGT, num_boxes=3)
    assert terms["l1"].item() == pytest.approx(reference["l1"].item(), abs=1e-6)
    assert terms["giou"].item() == pytest.approx(reference["giou"].item(), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(5 * reference["l1"].item() + 2 * reference["giou"].item(), rel=1e-6)
    # the 4 coordinates are summed, not averaged: 4x the mean over every coordinate
    assert terms["l1"].item() == pytest.approx(4 * F.l1_loss(SRC, TGT).item(), rel=1e-6)


def test_the_one_box_and_the_set_loss_agree_on_one_matched_box():
    """A multi-box head with one query on one true box pays what the one-box loss pays."""
    for src, tgt in zip(SRC, TGT):
        pred, truth = box_cxcywh_to_xyxy(src)[None], box_cxcywh_to_xyxy(tgt)[None]
        one = box_loss(pred, truth, WEIGHTS)
        matched = set_loss(pred[None], torch.zeros(1, 1), [truth], {**WEIGHTS, "score": 2.0})
        reference = detr_loss_boxes(src[None], tgt[None], num_boxes=1)
        for term in ("l1", "giou"):
            assert one[term].item() == pytest.approx(matched[term].item(), rel=1e-6)
            assert one[term].item() == pytest.approx(reference[term].item(), abs=1e-6)


def test_a_corner_outside_the_image_gets_a_gradient():
    """Nothing is clamped before the loss: the box reaching past the left border (x0 = -0.1) is
    pulled back by the loss through its cx and w. Clamped to [0, 1] first, the x0 = 0 corner of
    this box would match its target's x0 = 0 and leave cx and w without that pull."""
    raw = torch.tensor([[0.05, 0.5, 0.3, 0.4]], requires_grad=True)  # x0 = -0.1
    target = torch.tensor([[0.0, 0.3, 0.3, 0.7]])  # x0 = 0, x1 = 0.3
    box_loss(box_cxcywh_to_xyxy(raw), target, {"l1": 5.0})["loss"].backward()
    assert raw.grad[0, 0] < 0  # cx moves right, bringing x0 back into the image
    clamped = torch.tensor([[0.05, 0.5, 0.3, 0.4]], requires_grad=True)
    box_loss(box_cxcywh_to_xyxy(clamped).clamp(0, 1), target, {"l1": 5.0})["loss"].backward()
    assert raw.grad[0, 0] != pytest.approx(clamped.grad[0, 0].item())  # the clamp changed the pull


def test_the_model_returns_unclipped_boxes_and_post_processing_clips_them():
    boxes = box_cxcywh_to_xyxy(SRC)
    out = GroundingOutput(boxes, None, (boxes * 2,), query_boxes=boxes[None])
    assert (out.boxes < 0).any()
    clipped = out.clipped()
    assert ((clipped.boxes >= 0) & (clipped.boxes <= 1)).all()
    assert ((clipped.aux_boxes[0] >= 0) & (clipped.aux_boxes[0] <= 1)).all()
    assert ((clipped.query_boxes >= 0) & (clipped.query_boxes <= 1)).all()
    assert torch.equal(clipped.boxes[0], boxes[0])  # a box inside the image is left as it is


def test_absent_phrases_train_the_confidence_only():
    """Rows shown with an image that lacks their referent (NaN target): no box loss, quality
    target 0; the other rows' terms are what they would be alone."""
    pred = box_cxcywh_to_xyxy(SRC).requires_grad_(True)
    target = box_cxcywh_to_xyxy(TGT).clone()
    target[2] = float("nan")
    absent = torch.tensor([False, False, True])
    quality = torch.tensor([0.3, -0.2, 1.5], requires_grad=True)
    out = GroundingOutput(pred, quality)
    terms = grounding_loss(out, target, {**WEIGHTS, "quality": 1.0}, absent=absent)
    alone = box_loss(pred[:2], target[:2], WEIGHTS)
    assert terms["l1"].item() == pytest.approx(alone["l1"].item(), rel=1e-6)
    assert terms["giou"].item() == pytest.approx(alone["giou"].item(), rel=1e-6)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert torch.equal(pred.grad[2], torch.zeros(4))  # no box loss on the absent row
    labels = torch.stack([box_iou_one(pred[0].detach(), target[0]), box_iou_one(pred[1].detach(), target[1]),
                          torch.tensor(0.0)])
    expected = F.binary_cross_entropy_with_logits(quality.detach(), labels)
    assert terms["quality"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert quality.grad[2] > 0  # the absent row's confidence is pushed down


def box_iou_one(a, b):
    """torchvision's IoU of box ``a`` as post-processing writes it (clipped to the image) with ``b``."""
    return torchvision_box_iou(a[None].clamp(0, 1), b[None])[0, 0]


def test_the_quality_target_is_the_iou_of_the_box_as_written():
    """The quality head predicts the IoU of the box post-processing writes (clipped to the image)."""
    pred = box_cxcywh_to_xyxy(SRC[1:2])  # reaches past the border
    target = box_cxcywh_to_xyxy(TGT[1:2])
    logits = torch.zeros(1)
    written = box_iou_one(pred[0], target[0])
    expected = F.binary_cross_entropy_with_logits(logits, written[None])
    assert quality_loss(logits, pred, target).item() == pytest.approx(expected.item(), rel=1e-6)
    unclipped = torchvision_box_iou(pred, target)[0, 0]
    assert written != pytest.approx(unclipped.item())  # (the clip matters for this box)


def test_the_models_box_reaches_past_the_border_with_its_gradient():
    """A box the head puts past the left border comes out of the model as it is (x0 < 0) and
    passes its gradient on; clamped in the model, x0 would be 0 with no gradient."""
    from fiftyone_grounding.models.build import build_model, build_tokenizer

    model = build_model("tiny").train()
    last = model.head[-1]
    with torch.no_grad():  # the head's box: cx 0.02, w 0.3, whatever the input
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor([0.02, 0.5, 0.3, 0.3])))
    tokens = build_tokenizer(model.config)(["the red circle"], return_tensors="pt")
    out = model(torch.randn(1, 3, 64, 64), tokens["input_ids"], tokens["attention_mask"])
    assert out.boxes[0, 0] < 0
    out.boxes[0, 0].backward()
    assert last.bias.grad[0] != 0 and last.bias.grad[2] != 0


def test_the_judge_term_is_the_bce_of_the_quality_head_at_other_boxes_against_their_iou():
    """IoU-Net (Jiang et al. 2018) trains its IoU predictor on jittered true boxes: here the quality
    head reads K other boxes per phrase and learns their IoU with the true box (torchvision's);
    a phrase without a true box: 0 for every box."""
    from fiftyone_grounding.models.losses import judge_loss

    target = box_cxcywh_to_xyxy(TGT)
    boxes = torch.stack([box_cxcywh_to_xyxy(SRC), target, box_cxcywh_to_xyxy(TGT.flip(0))], 1)  # (3, 3, 4)
    logits = torch.randn(3, 3)
    iou = torch.stack([torch.diag(torchvision_box_iou(boxes[:, k], target)) for k in range(3)], 1)
    assert judge_loss(logits, boxes, target) == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, iou).item(), rel=1e-5)
    absent = target.clone()
    absent[1] = float("nan")
    iou[1] = 0.0
    assert judge_loss(logits, boxes, absent) == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, iou).item(), rel=1e-5)


def test_the_judged_boxes_span_every_iou_and_take_another_object_of_the_same_image():
    import numpy as np

    from fiftyone_grounding.models.losses import judge_boxes

    target = torch.tensor([[0.1, 0.1, 0.3, 0.4], [0.6, 0.5, 0.9, 0.8], [0.2, 0.6, 0.5, 0.9], [float("nan")] * 4])
    image_index = torch.tensor([0, 0, 1, 1])
    ious = []
    for seed in range(50):
        boxes = judge_boxes(target, image_index, np.random.default_rng(seed))
        assert boxes.shape == (4, 4, 4) and (boxes[..., 2:] > boxes[..., :2]).all()
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert torch.equal(boxes[0, 2], target[1]) and torch.equal(boxes[1, 2], target[0])  # the image's other object
        ious.append(torchvision_box_iou(boxes[0, :2], target[:1])[:, 0])
    ious = torch.cat(ious)
    assert ious.max() > 0.8 and ious.min() < 0.2 and 0.3 < ious.median() < 0.8


def test_the_judge_term_trains_the_quality_head_only_and_given_boxes_read_that_head():
    """The judged boxes come in detached (no gradient to the box head or the fusion); reading the
    head at the model's own box gives the model's own quality."""
    import numpy as np

    from fiftyone_grounding.models.build import build_model
    from fiftyone_grounding.models.losses import judge_boxes

    torch.manual_seed(0)
    model = build_model("tiny", weights=False)
    pixels = torch.randn(2, 3, 64, 64)
    ids = torch.randint(5, 100, (2, 6))
    mask = torch.ones_like(ids)
    target = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.5, 0.9, 0.8]])
    out = model(pixels, ids, mask, judge_boxes=judge_boxes(target, torch.arange(2), np.random.default_rng(0)))
    grounding_loss(out, target, {"l1": 0.0, "giou": 1e-9, "judge": 1.0})["judge"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("quality_head.") for n in grads)
    with torch.no_grad():
        out = model(pixels, ids, mask)
        assert torch.allclose(model.given_box_scores(out, out.boxes), out.quality.sigmoid(), atol=1e-6)
