"""Grounding evaluation in FiftyOne: perfect scores, hand arithmetic, independent computations."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.detection import IntersectionOverUnion
from torchvision.ops import box_iou

import fiftyone as fo
from fiftyone import ViewField as F

from fiftyone_grounding.evaluation.fiftyone_run import METRIC_URIS, GroundingEvaluationConfig, evaluate_in_fiftyone
from fiftyone_grounding.evaluation.scoring import evaluate_grounding
from fiftyone_grounding.data.labels import make_detections, migrate_label_scheme


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


# -- the grounding evaluation run at scale: the same as FiftyOne's own loop, and cleaned up whole ---------


def _mixed_dataset(name, tmp_path):
    """Samples of every kind: right (IoU 2/3, 1), wrong (IoU 1/3), no prediction, no valid truth
    (not scored), two predictions (only the first counts), a zero-size prediction."""
    gt = [[0.2, 0.2, 0.4, 0.4], [0.2, 0.2, 0.4, 0.4], [0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2],
          [0.1, 0.1, 0.0, 0.3], [0.3, 0.3, 0.3, 0.3], [0.1, 0.6, 0.2, 0.2]]
    pred = [[0.28, 0.2, 0.4, 0.4], [0.4, 0.2, 0.4, 0.4], None, [0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2],
            [0.3, 0.3, 0.3, 0.3], [0.1, 0.6, 0.0, 0.2]]
    confidence = [0.8, 0.6, None, 0.9, 0.5, 0.7, 0.3]
    dataset = fo.Dataset(name)
    samples = []
    for i, (g, p, c) in enumerate(zip(gt, pred, confidence)):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (100, 80)).save(path)
        phrase = f"object number {i}"
        prediction = fo.Detections(detections=[fo.Detection(label="referent", bounding_box=p, confidence=c,
                                                            expression=phrase)]) if p else None
        if i == 5:  # a second predicted box after the first: ignored by the one-box evaluation
            prediction.detections.append(fo.Detection(label="referent", bounding_box=[0.0, 0.0, 0.1, 0.1],
                                                      confidence=0.95))
        samples.append(fo.Sample(filepath=str(path), split="test" if i % 2 else "val", category=f"c{i % 3}",
                                 ground_truth=fo.Detections(detections=[fo.Detection(label="referent",
                                                                                     bounding_box=g)]),
                                 predictions=prediction))
    dataset.add_samples(samples)
    return dataset


def _rounded(values):
    if isinstance(values, list):
        return [_rounded(v) for v in values]
    return round(values, 9) if isinstance(values, float) else values


def _fields(dataset):
    return sorted(dataset.get_field_schema(flat=True))


def test_the_bulk_run_writes_what_fiftyones_own_loop_writes(dataset_name, tmp_path):
    dataset = _mixed_dataset(dataset_name, tmp_path)
    fast = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="fast")
    slow = dataset.evaluate_detections("predictions", "ground_truth", eval_key="slow",
                                       method=GroundingEvaluationConfig, custom_metrics=list(METRIC_URIS))
    results = dataset.load_evaluation_results("fast")
    assert (fast["tp"], fast["fp"], fast["fn"]) == (3, 2, 3)
    assert dataset.values("fast_tp") == dataset.values("slow_tp") == [1, 0, 0, 1, 0, 1, 0]  # unscored: 0
    assert dataset.values("fast_fp") == dataset.values("slow_fp") == [0, 1, 0, 0, 0, 0, 1]
    assert dataset.values("fast_iou") == pytest.approx(dataset.values("slow_iou"), nan_ok=True)
    for field in ("predictions", "ground_truth"):
        for suffix in ("", "_id", "_iou"):
            a = dataset.values(f"{field}.detections.fast{suffix}")
            b = dataset.values(f"{field}.detections.slow{suffix}")
            assert _rounded(a) == _rounded(b), (field, suffix)
    assert dataset.values("predictions.detections.fast")[5] == ["tp", None]  # the second box is not scored
    assert results.mAP() == pytest.approx(slow.mAP()) and results.mAR() == pytest.approx(slow.mAR())
    assert results.custom_metrics == slow.custom_metrics
    assert {m["label"]: m["value"] for m in results.custom_metrics.values()}["mIoU"] == pytest.approx(
        fast["overall"]["miou"])
    assert fast["unscored"] == 1 and fast["overall"]["count"] == 6


def test_the_map_is_fiftyones_coco_map_with_one_class(dataset_name, tmp_path):
    """With one box per sample and distinct confidences, the grounding AP at each IoU threshold is
    COCO's AP as FiftyOne computes it."""
    rng = np.random.default_rng(1)
    gt = [[float(x), float(y), 0.3, 0.3] for x, y in rng.uniform(0.0, 0.6, (40, 2))]
    pred = [[x + float(rng.normal(0, 0.08)), y + float(rng.normal(0, 0.08)), w, h] for x, y, w, h in gt]
    pred = [[min(max(x, 0.0), 0.7), min(max(y, 0.0), 0.7), w, h] for x, y, w, h in pred]
    dataset = _grounding_dataset(dataset_name, tmp_path, gt, pred)
    dataset.set_values("predictions.detections.confidence", [[float(c)] for c in rng.permutation(40) / 40 + 0.01])
    for field in ("ground_truth", "predictions"):  # one class, as the importers write it
        dataset.set_values(f"{field}.detections.label", [["referent"]] * 40)
    ours = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="ours")
    coco = dataset.evaluate_detections("predictions", "ground_truth", eval_key="coco", compute_mAP=True)
    assert ours["mAP"] == pytest.approx(coco.mAP(), abs=1e-9)
    assert 0.05 < ours["mAP"] < 0.95


def test_a_confidence_that_ranks_by_iou_gives_the_best_ap(dataset_name, tmp_path):
    rng = np.random.default_rng(2)
    gt = [[float(x), float(y), 0.3, 0.3] for x, y in rng.uniform(0.0, 0.6, (60, 2))]
    pred = [[x + float(rng.normal(0, 0.1)), y + float(rng.normal(0, 0.1)), w, h] for x, y, w, h in gt]
    pred = [[min(max(x, 0.0), 0.7), min(max(y, 0.0), 0.7), w, h] for x, y, w, h in pred]
    dataset = _grounding_dataset(dataset_name, tmp_path, gt, pred)
    ious = np.asarray(evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="iou") and
                      dataset.values("iou_iou"))
    assert 0.2 < (ious >= 0.5).mean() < 0.8

    def run(confidences, key):
        dataset.set_values("predictions.detections.confidence", [[float(c)] for c in confidences])
        return evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key=key)

    best = run(ious, "best")
    shuffled = [run(rng.permutation(ious), f"shuffled{k}") for k in range(3)]
    worst = run(1 - ious, "worst")
    assert best["overall"]["auroc"] == 1.0 and worst["overall"]["auroc"] == 0.0
    assert all(best["mAP"] > s["mAP"] > worst["mAP"] for s in shuffled)
    # the boxes did not change: neither did mIoU nor Acc@0.5
    assert len({r["overall"]["miou"] for r in [best, worst, *shuffled]}) == 1


def test_a_prediction_is_never_matched_with_another_samples_box(dataset_name, tmp_path):
    """Two expressions of one image, each predicting the other's box: both wrong."""
    Image.new("RGB", (100, 80)).save(tmp_path / "shared.png")
    a, b = [0.1, 0.1, 0.3, 0.3], [0.6, 0.5, 0.3, 0.3]
    dataset = fo.Dataset(dataset_name)
    dataset.add_samples([fo.Sample(filepath=str(tmp_path / "shared.png"), expression=f"phrase {i}",
                                   ground_truth=make_detections(_xywh_to_xyxy(g), f"phrase {i}"),
                                   predictions=make_detections(_xywh_to_xyxy(p), f"phrase {i}", confidence=0.9))
                         for i, (g, p) in enumerate([(a, b), (b, a)])])
    result = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="swap")
    assert (result["tp"], result["fp"], result["fn"]) == (0, 2, 2) and result["overall"]["miou"] == 0.0
    assert dataset.values("predictions.detections.swap") == [["fp"], ["fp"]]


def test_delete_and_rename_leave_no_stray_field(dataset_name, tmp_path):
    dataset = _mixed_dataset(dataset_name, tmp_path)
    before = _fields(dataset)
    evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="first")
    written = set(_fields(dataset)) - set(before)
    assert {"first_tp", "first_fp", "first_fn", "first_iou", "predictions.detections.first",
            "predictions.detections.first_iou", "ground_truth.detections.first_id"} <= written
    dataset.rename_evaluation("first", "second")
    assert set(_fields(dataset)) - set(before) == {f.replace("first", "second") for f in written}
    assert dataset.values("second_iou")[0] == pytest.approx(2 / 3)
    dataset.delete_evaluation("second")
    assert _fields(dataset) == before and dataset.list_evaluations() == []


def test_a_run_stored_by_the_released_version_still_loads(dataset_name, tmp_path):
    """FiftyOne stores the class paths of a run's config and results; 0.1.0 wrote those of its
    flat layout ("fiftyone_grounding.evaluate.GroundingResults"). Such a run loads, in the Model
    Evaluation panel's own code too, and deletes cleanly."""
    from bson import json_util
    from plugins.panels.model_evaluation import EvaluationPanel

    from fiftyone_grounding.evaluation.fiftyone_run import GroundingResults

    gt = [[0.2, 0.2, 0.4, 0.4], [0.2, 0.2, 0.4, 0.4], [0.1, 0.1, 0.2, 0.2]]
    pred = [[0.28, 0.2, 0.4, 0.4], [0.4, 0.2, 0.4, 0.4], None]
    dataset = _grounding_dataset(dataset_name, tmp_path, gt, pred)
    before = _fields(dataset)
    result = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="old")
    run = dataset._doc.evaluations["old"]  # the run document, rewritten as 0.1.0 stored it
    assert run.config["cls"] == "fiftyone_grounding.evaluation.fiftyone_run.GroundingEvaluationConfig"
    run.config["cls"] = "fiftyone_grounding.evaluate.GroundingEvaluationConfig"
    run.results.seek(0)
    stored = json_util.loads(run.results.read().decode())
    assert stored["cls"] == "fiftyone_grounding.evaluation.fiftyone_run.GroundingResults"
    stored["cls"] = "fiftyone_grounding.evaluate.GroundingResults"
    run.results.replace(json_util.dumps(stored).encode(), content_type="application/json")
    run.save()
    dataset.reload()
    assert dataset._doc.evaluations["old"].config["cls"] == "fiftyone_grounding.evaluate.GroundingEvaluationConfig"

    info = dataset.get_evaluation_info("old")
    assert isinstance(info.config, GroundingEvaluationConfig) and info.config.method == "grounding"
    results = dataset.load_evaluation_results("old", cache=False)
    assert isinstance(results, GroundingResults)
    assert results.mAP() == pytest.approx(result["mAP"])
    panel = EvaluationPanel()
    assert panel.get_tp_fp_fn(info, results) == (1, 1, 2)
    assert panel.get_map(results) == pytest.approx(result["mAP"])
    assert results.custom_metrics["@fiftyone-grounding/grounding/miou"]["value"] == pytest.approx(1 / 3)
    dataset.delete_evaluation("old")
    assert _fields(dataset) == before and dataset.list_evaluations() == []


def test_old_scheme_datasets_migrate_and_evaluate_the_same(dataset_name, tmp_path):
    """A dataset written before the label scheme (the phrase as every box's label): the grounding
    metrics are the same before and after the migration, and the FiftyOne run has one class."""
    gt = [[0.2, 0.2, 0.4, 0.4], [0.2, 0.2, 0.4, 0.4], [0.1, 0.1, 0.2, 0.2]]
    pred = [[0.28, 0.2, 0.4, 0.4], [0.4, 0.2, 0.4, 0.4], [0.12, 0.1, 0.2, 0.2]]
    dataset = _grounding_dataset(dataset_name, tmp_path, gt, pred)
    for field in ("ground_truth", "predictions"):  # the old scheme
        dataset.set_values(f"{field}.detections.label", [[f"object number {i}"] for i in range(3)])
    old = evaluate_grounding(dataset, "predictions", "ground_truth", print_table=False)
    migrate_label_scheme(dataset)
    new = evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="migrated")
    assert new["overall"] == pytest.approx(old["overall"], nan_ok=True) and new["splits"].keys() == old["splits"].keys()
    assert dataset.load_evaluation_results("migrated").classes.tolist() == ["referent"]
    assert dataset.values("ground_truth.detections.expression")[2] == ["object number 2"]


def test_split_and_category_become_the_panels_scenarios(dataset_name, tmp_path):
    """The Model Evaluation panel reads scenarios from its store; each subset of ours gives the
    grounding metrics of that subset (the results' other arrays and the IoUs stay aligned)."""
    from fiftyone.operators.store import ExecutionStore

    dataset = _mixed_dataset(dataset_name, tmp_path)
    evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="scen")
    evaluate_in_fiftyone(dataset, "predictions", "ground_truth", eval_key="again")  # updates, adds none
    scenarios = ExecutionStore.create("model_evaluation_panel_builtin", dataset._doc.id).get("scenarios")
    by_field = {s["field"]: s for s in scenarios.values()}
    assert set(by_field) == {"split", "category"} and len(scenarios) == 2
    assert by_field["split"]["subsets"] == ["test", "val"] and by_field["split"]["type"] == "sample_field"
    results = dataset.load_evaluation_results("scen")
    for split in ("test", "val"):
        view = dataset.match(F("split") == split)
        expected = evaluate_grounding(view, "predictions", "ground_truth", iou_field="check", print_table=False)
        with results.use_subset(dict(type="field", field="split", value=split)):
            truths = int((results.ytrue != results.missing).sum())
            assert truths == expected["overall"]["count"]
            scored = np.array([v for v in view.values("check") if v is not None])
            assert results.mAR() == pytest.approx(np.mean([(scored >= t).mean() for t in np.linspace(0.5, 0.95, 10)]))
        assert len(results.ious) == len(results.ytrue)
