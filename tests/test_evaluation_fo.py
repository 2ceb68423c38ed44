"""Grounding evaluation in FiftyOne: perfect scores, hand arithmetic, independent computations."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import IntersectionOverUnion
from torchvision.ops import box_iou

import fiftyone as fo

from fiftyone_grounding.evaluate import evaluate_in_fiftyone
from fiftyone_grounding.labels import make_detections


def _xywh_to_xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def _grounding_dataset(name, tmp_path, gt_boxes, pred_boxes, size=(100, 80)):
    """One image per sample; boxes are FiftyOne relative [x, y, w, h] (a None prediction: none)."""
    samples = []
    for i, (gt, pred) in enumerate(zip(gt_boxes, pred_boxes)):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size).save(path)
        phrase = f"object number {i}"
        samples.append(fo.Sample(
            filepath=str(path), expression=phrase, split="test" if i % 2 else "val",
            ground_truth=make_detections(_xywh_to_xyxy(gt), phrase),
            predictions=make_detections(_xywh_to_xyxy(pred), phrase, confidence=0.9) if pred else None))
    dataset = fo.Dataset(name)
    dataset.add_samples(samples)
    return dataset


def test_a_perfect_prediction_scores_one_on_every_metric(dataset_name, tmp_path):
    boxes = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.25, 0.25], [0.0, 0.0, 1.0, 1.0], [0.6, 0.1, 0.05, 0.7]]
    dataset = _grounding_dataset(dataset_name, tmp_path, boxes, boxes)
    result = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="perfect")

    assert result["mAP"] == pytest.approx(1.0)  # FiftyOne's own COCO-style mAP
    assert (result["tp"], result["fp"], result["fn"]) == (4, 0, 0)
    for metrics in [result["overall"], *result["splits"].values()]:
        assert metrics["miou"] == pytest.approx(1.0)
        assert metrics["acc50"] == metrics["acc75"] == 1.0
    assert dataset.values("predictions.detections.perfect") == [["tp"]] * 4
    assert dataset.values("perfect_iou") == pytest.approx([1.0] * 4)


def test_a_shifted_box_scores_what_hand_arithmetic_says(dataset_name, tmp_path):
    # Ground truth 0.4 x 0.4. Shifted right by 0.08: overlap 0.32 x 0.4 = 0.128, union 0.16 + 0.16
    # - 0.128 = 0.192, IoU 2/3. Shifted by 0.2: overlap 0.08, union 0.24, IoU 1/3.
    gt = [[0.2, 0.2, 0.4, 0.4], [0.2, 0.2, 0.4, 0.4], [0.1, 0.1, 0.2, 0.2]]
    pred = [[0.28, 0.2, 0.4, 0.4], [0.4, 0.2, 0.4, 0.4], None]
    dataset = _grounding_dataset(dataset_name, tmp_path, gt, pred)
    result = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="shift")

    assert dataset.values("shift_iou") == pytest.approx([2 / 3, 1 / 3, 0.0])
    overall = result["overall"]
    assert overall["miou"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert overall["acc50"] == pytest.approx(1 / 3) and overall["acc75"] == 0.0
    assert result["missing_predictions"] == 1
    # FiftyOne: IoU 2/3 matches at 0.5 (TP); IoU 1/3 is a FP and a FN; no prediction is a FN.
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 2)
    # mAP: one class, COCO's 101-point AP at IoU 0.50, 0.55, ..., 0.95. The 2/3 box ranks first
    # (equal confidences keep the samples' order), so at 0.50-0.65 recall 1/3 comes at precision 1:
    # 34 of the 101 recall points (0, 0.01, ..., 0.33); above 0.65 no box counts.
    assert result["mAP"] == pytest.approx(4 * 34 / 101 / 10)


def test_ious_agree_with_torchvision_torchmetrics_and_fiftyone(dataset_name, tmp_path):
    rng = np.random.default_rng(0)

    def random_boxes(n):
        xy = rng.uniform(0.0, 0.5, size=(n, 2))
        wh = rng.uniform(0.1, 0.5, size=(n, 2))
        return np.concatenate([xy, wh], axis=1).tolist()

    gt = random_boxes(30)
    # Predictions near the truth, so that IoUs spread over [0, 1].
    pred = [[x + rng.normal(0, 0.06), y + rng.normal(0, 0.06), w, h] for x, y, w, h in gt]
    pred = [[min(max(x, 0.0), 1 - w), min(max(y, 0.0), 1 - h), w, h] for x, y, w, h in pred]
    dataset = _grounding_dataset(dataset_name, tmp_path, gt, pred)
    result = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="rand")
    ours = np.asarray(dataset.values("rand_iou"))

    gt_xyxy = torch.tensor([_xywh_to_xyxy(b) for b in gt], dtype=torch.float64)
    pred_xyxy = torch.tensor([_xywh_to_xyxy(b) for b in pred], dtype=torch.float64)
    np.testing.assert_allclose(ours, box_iou(pred_xyxy, gt_xyxy).diagonal().numpy(), atol=1e-6)

    metric = IntersectionOverUnion(box_format="xyxy")
    metric.update([{"boxes": p[None].float(), "labels": torch.tensor([0])} for p in pred_xyxy],
                  [{"boxes": g[None].float(), "labels": torch.tensor([0])} for g in gt_xyxy])
    assert result["overall"]["miou"] == pytest.approx(metric.compute()["iou"].item(), abs=1e-5)

    # FiftyOne's own matching: the TPs are exactly the IoU >= 0.5 samples, with the same IoUs.
    assert 0 < result["tp"] < len(gt)
    assert result["tp"] == int((ours >= 0.5).sum()) == round(result["overall"]["acc50"] * len(gt))
    fo_ious = dataset.values("predictions.detections.rand_iou")
    matched = [(i, d[0]) for i, d in enumerate(fo_ious) if d and d[0] is not None]
    assert len(matched) == result["tp"]
    np.testing.assert_allclose([v for _, v in matched], ours[[i for i, _ in matched]], atol=1e-6)
