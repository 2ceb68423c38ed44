"""The confidence: its metrics against independent computations and hand arithmetic, its
calibration, and what checkpoints with and without a quality head write."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import fiftyone as fo

from fiftyone_grounding.inference.apply import apply_grounding_model
from fiftyone_grounding.models.checkpoint import load_checkpoint, save_checkpoint
from fiftyone_grounding.evaluation.confidence import accuracy_at_coverage, auroc, confidence_metrics
from fiftyone_grounding.models.calibration import (
    CALIBRATION_NAME, Calibration, expected_calibration_error, fit_calibration)
from fiftyone_grounding.errors import CheckpointError
from fiftyone_grounding.evaluation.fiftyone_run import evaluate_in_fiftyone
from fiftyone_grounding.evaluation.scoring import evaluate_grounding
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.models.build import build_model


def test_auroc_is_sklearns_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200) / 4.0  # many ties
    positive = rng.random(200) < 0.3 + 0.4 * scores
    assert auroc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
    assert auroc([0.1, 0.9], [False, True]) == 1.0 and auroc([0.5, 0.5], [False, True]) == 0.5
    assert auroc([0.2, 0.3], [True, True]) is None  # one class: undefined


def test_calibration_error_and_coverage_by_hand():
    # bin [0.9, 1.0): confidences 0.9, 0.9, accuracy 1/2 -> gap 0.4; bin [0.2, 0.3): 0.2, accuracy 0 -> 0.2
    assert expected_calibration_error([0.9, 0.9, 0.2], [True, False, False]) == pytest.approx((2 * 0.4 + 0.2) / 3)
    assert expected_calibration_error([1.0, 0.0], [True, False]) == 0.0
    # most confident first: 0.9 (right), 0.8 (wrong), 0.3 (right), 0.1 (wrong)
    conf, right = [0.3, 0.9, 0.1, 0.8], [True, True, False, False]
    assert accuracy_at_coverage(conf, right, 0.5) == 0.5
    assert accuracy_at_coverage(conf, right, 0.25) == 1.0 and accuracy_at_coverage(conf, right, 1.0) == 0.5
    metrics = confidence_metrics([0.6, 0.9, 0.2, 0.4], conf)  # IoU >= 0.5 is right: the same as `right`
    assert metrics["auroc"] == pytest.approx(0.75) and metrics["acc_at_50_coverage"] == 0.5
    assert set(confidence_metrics([0.6, 0.2], [None, None]).values()) == {None}


def test_platt_calibration_fixes_an_overconfident_head_and_keeps_its_order():
    rng = np.random.default_rng(1)
    true_logit = rng.normal(0.0, 1.5, 4000)
    right = rng.random(4000) < 1 / (1 + np.exp(-true_logit))
    ious = np.where(right, 0.8, 0.3)
    logits = 4.0 * true_logit + 1.0  # far too confident, and shifted
    calibration = fit_calibration(logits, ious)
    assert calibration.method == "platt" and calibration.fitted_on == 4000
    before = expected_calibration_error(1 / (1 + np.exp(-logits)), right)
    assert calibration.val_ece < 0.03 < before
    assert calibration.a == pytest.approx(0.25, rel=0.15)
    confidence = calibration(logits)
    assert auroc(confidence, right) == pytest.approx(auroc(logits, right))  # strictly increasing
    assert len(np.unique(confidence)) == len(np.unique(logits))  # no new ties
    assert fit_calibration(logits[:10], ious[:10]).method == "identity"  # too few to fit


def test_a_calibration_round_trips_and_a_bad_one_is_refused(tmp_path):
    Calibration("platt", 0.5, -0.25, fitted_on=10, val_ece=0.01).save(tmp_path)
    assert Calibration.load(tmp_path) == Calibration("platt", 0.5, -0.25, fitted_on=10, val_ece=0.01)
    assert Calibration.load(tmp_path / "elsewhere") == Calibration()  # none saved: the predicted IoU
    (tmp_path / CALIBRATION_NAME).write_text(json.dumps({"method": "platt", "a": -1.0, "b": 0.0}))
    with pytest.raises(CheckpointError, match="a > 0"):
        Calibration.load(tmp_path)
    (tmp_path / CALIBRATION_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="is not a confidence calibration"):
        Calibration.load(tmp_path)


def test_training_calibrates_the_best_checkpoint_and_apply_uses_it(tiny_checkpoint, synthetic_dataset):
    """fit() wrote calibration.json into best/; a box's confidence is that calibration of the
    logit of P(present) x the predicted IoU (the presence and quality heads)."""
    saved = Calibration.load(tiny_checkpoint)
    assert (tiny_checkpoint / CALIBRATION_NAME).exists() and saved.fitted_on == len(
        synthetic_dataset.match({"split": "val"}))
    model = GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")
    assert model.model.calibration == saved
    pixels = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    phrases = ["the red circle", "the large square"]
    prediction = model.predict_boxes(pixels, phrases).result()
    tokens = model.tokenize(phrases)
    with torch.no_grad():
        from fiftyone_grounding.data.images import normalize_pixels_batch

        out = model.model(normalize_pixels_batch(pixels, model.config.image_mean, model.config.image_std),
                          tokens["input_ids"], tokens["attention_mask"])
    both = out.quality.sigmoid() * out.exists.sigmoid()
    np.testing.assert_allclose(prediction.confidences, saved(torch.logit(both).numpy()), rtol=1e-5)
    assert ((prediction.confidences > 0) & (prediction.confidences < 1)).all()


def test_a_checkpoint_without_a_quality_head_still_loads_and_applies(tmp_path, synthetic_dataset, dataset_name):
    """A tiny model as written before the quality head (its config.json has no quality_head key),
    and the seed's head: boxes without a confidence; no confidence metrics, no mAP."""
    model = build_model("tiny", quality_head=False, presence_head=False, loss_weights={"l1": 5.0, "giou": 2.0})
    save_checkpoint(model, tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["quality_head"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert not (tmp_path / "old" / CALIBRATION_NAME).exists()
    assert load_checkpoint(tmp_path / "old").quality_head is None

    ds = synthetic_dataset.limit(6).clone(dataset_name)
    grounding = GroundingModel.from_checkpoint(tmp_path / "old", device="cpu")
    apply_grounding_model(ds, grounding, label_field="pred")
    assert ds.count("pred.detections") == 6 and ds.distinct("pred.detections.confidence") == []
    metrics = evaluate_grounding(ds, "pred", "ground_truth", print_table=False)["overall"]
    assert metrics["auroc"] is None and metrics["ece"] is None and 0 <= metrics["miou"] <= 1
    assert evaluate_in_fiftyone(ds, "pred", "ground_truth", eval_key="old")["mAP"] is None
    # FiftyOne's confidence threshold drops boxes without a confidence, as it does for any model
    ds.apply_model(grounding, label_field="thresholded", prompt_field="expression", confidence_thresh=0.1)
    assert ds.count("thresholded.detections") == 0 and isinstance(ds.first().thresholded, fo.Detections)


def test_the_calibration_folds_split_images_not_rows():
    """The phrases of one image sit in one fold: alike, they would otherwise be fitted on one
    side and judged on the other."""
    from fiftyone_grounding.models.calibration import two_folds

    images = ["a", "a", "a", "b", "c", "c", "b", "d"]
    folds = two_folds(images)
    for image in set(images):
        assert len({f for f, i in zip(folds, images) if i == image}) == 1
    assert set(folds.tolist()) == {0, 1}
    assert two_folds(range(4)).tolist() == [0, 1, 0, 1]  # one row an image: rows alternate, as before
    rng = np.random.default_rng(0)
    logits = rng.normal(size=200)
    ious = (rng.random(200) < 1 / (1 + np.exp(-logits))).astype(float)
    by_image = fit_calibration(logits, ious, groups=[i // 7 for i in range(200)])
    assert by_image.fitted_on == 200
