"""The GREC scorer on hand-made cases whose right answer follows from the official scorer's rules."""

import numpy as np
import pytest

from fiftyone_grounding.models.boxes import box_iou, generalized_box_iou
from fiftyone_grounding.evaluation.grec import Expression, grec_metrics, score_expression, threshold_sweep

A = [0.05, 0.05, 0.30, 0.30]
B = [0.50, 0.10, 0.80, 0.40]
C = [0.20, 0.60, 0.45, 0.95]


def test_no_target_is_right_only_when_no_box_passes_the_threshold():
    quiet = score_expression(Expression.of([A], [0.69], [], no_target=True))
    assert quiet.correct and quiet.kept == 0 and quiet.f1 == 1.0
    loud = score_expression(Expression.of([A, B], [0.70, 0.2], [], no_target=True))  # >= 0.7 is kept
    assert not loud.correct and loud.kept == 1 and loud.f1 == 0.0
    m = grec_metrics([Expression.of([A], [0.69], [], True), Expression.of([A], [0.9], [], True)])
    assert m["n_acc"] == 0.5 and m["t_acc"] is None and m["pr_f1"] == 0.5 and m["no_target"] == 2


def test_three_targets_with_one_missed_is_wrong():
    s = score_expression(Expression.of([A, B], [0.9, 0.8], [A, B, C]))
    assert (s.tp, s.fp, s.fn) == (2, 0, 1) and s.f1 == pytest.approx(0.8) and not s.correct
    s = score_expression(Expression.of([C, A, B], [0.75, 0.9, 0.8], [A, B, C]))
    assert (s.tp, s.fp, s.fn) == (3, 0, 0) and s.correct


def test_a_duplicate_box_is_a_false_positive():
    near_a = [0.06, 0.05, 0.30, 0.31]
    s = score_expression(Expression.of([A, near_a], [0.9, 0.85], [A]))
    assert (s.tp, s.fp, s.fn) == (1, 1, 0) and s.f1 == pytest.approx(2 / 3) and not s.correct
    # the duplicate below the threshold is not kept: right
    assert score_expression(Expression.of([A, near_a], [0.9, 0.5], [A])).correct


def test_matching_uses_giou_not_iou():
    truth = np.array([0.0, 0.0, 0.5, 0.5])
    pred = np.array([0.09, 0.09, 0.59, 0.59])  # shifted along the diagonal: a larger enclosing box
    assert box_iou(pred, truth) >= 0.5 > generalized_box_iou(pred, truth)
    s = score_expression(Expression.of([pred], [0.9], [truth]))
    assert (s.tp, s.fp, s.fn) == (0, 1, 1) and not s.correct
    assert score_expression(Expression.of([pred], [0.9], [truth]), iou_thresh=0.45).correct


def test_greedy_matching_takes_the_best_pair_first_and_each_box_once():
    # p0 and p1 both cover t0 (p0 better); t1 is covered by neither. (p0, t0) is matched first, then
    # p1 has no truth left above 0.5: one TP, p1 a false positive, t1 missed.
    t0, t1 = [0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0]
    p0, p1 = [0.0, 0.0, 0.4, 0.41], [0.02, 0.0, 0.4, 0.4]
    s = score_expression(Expression.of([p0, p1], [0.9, 0.8], [t0, t1]))
    assert (s.tp, s.fp, s.fn) == (1, 1, 1)


def test_empty_predictions_and_order_of_scores():
    s = score_expression(Expression.of(np.zeros((0, 4)), [], [A]))
    assert (s.kept, s.tp, s.fn, s.correct) == (0, 0, 1, False)
    assert score_expression(Expression.of(np.zeros((0, 4)), [], [], True)).correct
    m = grec_metrics([Expression.of([A], [0.9], [A]), Expression.of([], [], [B]), Expression.of([], [], [], True)])
    assert m["pr_f1"] == pytest.approx(2 / 3) and m["t_acc"] == 0.5 and m["n_acc"] == 1.0
    with pytest.raises(ValueError, match="scores"):
        Expression.of([A, B], [0.9], [A])


def test_the_threshold_sweep_trades_no_target_accuracy_for_target_accuracy():
    rng = np.random.default_rng(0)
    expressions = []
    for k in range(60):
        truths = [] if k % 3 == 0 else [A] if k % 3 == 1 else [A, C]
        boxes = [A, C, B]
        expressions.append(Expression.of(boxes, rng.random(3), truths))
    sweep = threshold_sweep(expressions, (0.2, 0.5, 0.8))
    n_acc, t_acc = [r["n_acc"] for r in sweep], [r["t_acc"] for r in sweep]
    assert n_acc == sorted(n_acc) and t_acc == sorted(t_acc, reverse=True)
    assert [r["score_thresh"] for r in sweep] == [0.2, 0.5, 0.8] and sweep[0]["several_targets"] == 20


def test_evaluate_grec_reads_the_fields_and_scores_as_the_scorer(dataset_name, tmp_path):
    """On a synthetic dataset of phrases of no, one and several objects: the truth itself as the
    prediction scores 1; dropping a box of each several-target phrase fails exactly those; a box
    on every no-target phrase fails those; a box below the threshold is not kept."""
    from fiftyone_grounding.evaluation.tables import format_grec_table
    from fiftyone_grounding.evaluation.scoring import evaluate_grec, evaluate_grounding
    from fiftyone_grounding.data.labels import make_box_detections
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(dataset_name, num_images=40, out_dir=str(tmp_path), seed=4, several_fraction=0.5,
                                none_fraction=0.3, persistent=False, progress=False)
    kinds = ds.values("phrase_kind")
    truths = ds.values("ground_truth")

    def write(field, make):
        values = {}
        for sid, gt, phrase, kind in zip(ds.values("id"), truths, ds.values("expression"), kinds):
            boxes, confs = make(gt, kind)
            det = make_box_detections(boxes, phrase)
            for d, c in zip(det.detections, confs):
                d.confidence = c
            values[sid] = det
        ds.set_values(field, values, key_field="id")

    def boxes_of(gt):
        return [[x, y, x + w, y + h] for x, y, w, h in (d.bounding_box for d in gt.detections)]

    write("perfect", lambda gt, kind: (boxes_of(gt), [0.9] * len(gt.detections)))
    perfect = evaluate_grec(ds, "perfect", split_field=None)["overall"]
    assert perfect["pr_f1"] == perfect["n_acc"] == perfect["t_acc"] == 1.0
    assert perfect["count"] == len(ds) and perfect["no_target"] == kinds.count("none") > 0

    write("drop_one", lambda gt, kind: (boxes_of(gt)[:1], [0.9] * min(1, len(gt.detections))))
    dropped = evaluate_grec(ds, "drop_one", split_field=None)["overall"]
    assert dropped["pr_f1"] == pytest.approx(1 - kinds.count("several") / len(ds))

    full = [0.1, 0.1, 0.9, 0.9]
    write("always", lambda gt, kind: (boxes_of(gt) or [full], [0.9] * max(1, len(gt.detections))))
    always = evaluate_grec(ds, "always", split_field=None)
    assert always["overall"]["n_acc"] == 0.0 and always["overall"]["t_acc"] == 1.0
    assert ds.values("always_f1") == [0.0 if k == "none" else 1.0 for k in kinds]

    write("unsure", lambda gt, kind: (boxes_of(gt) or [full], [0.5] * max(1, len(gt.detections))))
    unsure = evaluate_grec(ds, "unsure", split_field=None)
    assert unsure["overall"]["n_acc"] == 1.0 and unsure["overall"]["t_acc"] == 0.0  # nothing kept at 0.7
    # no record of the field: the stored boxes answer 0.5 (their lowest confidence) and up, not 0.3 or 0.4
    assert [r["t_acc"] for r in unsure["sweep"] if r["score_thresh"] <= 0.5] == [None, None, 1.0]
    assert "Pr@F1=1" in format_grec_table(unsure)

    both = evaluate_grounding(ds, "perfect", print_table=False)  # the one-box table skips them; grec scores all
    assert both["grec"]["overall"]["pr_f1"] == 1.0 and both["no_target"] + both["several_targets"] > 0


def test_the_fiftyone_run_of_generalized_phrases_is_cocos_with_the_grec_metrics(dataset_name, tmp_path):
    """FiftyOne's own COCO evaluation counts every box (and the boxes of phrases of nothing):
    the truth as the prediction is all TP; a box on every no-target phrase is an FP each."""
    from fiftyone_grounding.evaluation.fiftyone_run import evaluate_in_fiftyone
    from fiftyone_grounding.data.labels import make_box_detections
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(dataset_name, num_images=30, out_dir=str(tmp_path), seed=6, several_fraction=0.5,
                                none_fraction=0.3, persistent=False, progress=False)
    values = {}
    for sid, gt, phrase, kind in zip(ds.values("id"), ds.values("ground_truth"), ds.values("expression"),
                                     ds.values("phrase_kind")):
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (d.bounding_box for d in gt.detections)]
        det = make_box_detections(boxes or [[0.1, 0.1, 0.5, 0.5]], phrase)
        for d in det.detections:
            d.confidence = 0.9
        values[sid] = det
    ds.set_values("pred", values, key_field="id")
    result = evaluate_in_fiftyone(ds, "pred", "ground_truth", eval_key="g")
    boxes = sum(len(gt.detections) for gt in ds.values("ground_truth"))
    nothing = ds.values("phrase_kind").count("none")
    assert (result["tp"], result["fp"], result["fn"]) == (boxes, nothing, 0) and 0 < result["mAP"] <= 1
    assert result["grec"]["overall"]["n_acc"] == 0.0 and result["grec"]["overall"]["t_acc"] == 1.0
    info = ds.get_evaluation_info("g")
    assert info.config.method == "coco"
    metrics = ds.load_evaluation_results("g").custom_metrics
    assert metrics["@fiftyone-grounding/grounding/pr_f1"]["value"] == pytest.approx(1 - nothing / len(ds))
    ds.delete_evaluation("g")
    assert not ds.has_field("g_tp")


def test_a_multi_box_model_trains_on_the_phrases_of_nothing_and_of_several(dataset_name, tmp_path):
    """fit reads them all (scale augmentation included, with phrases that have no box); the
    checkpoint loads; apply writes each phrase's boxes from the threshold, none below it."""
    from fiftyone_grounding.inference.apply import apply_grounding_model
    from fiftyone_grounding.data.records import NO_TARGET, SEVERAL_TARGETS
    from fiftyone_grounding.inference.model import GroundingModel
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset
    from fiftyone_grounding.engine.fit import fit

    ds = make_synthetic_dataset(dataset_name, num_images=24, out_dir=str(tmp_path / "images"), seed=8,
                                several_fraction=0.5, none_fraction=0.3, persistent=False, progress=False)
    result = fit(ds, preset="tiny-fusion-multi", epochs=1, batch_size=16, augment="scale+flip", val_split=None,
                 out_dir=str(tmp_path / "run"), progress=False, cpu=True)
    assert not {why for _, why in result.skipped} & {NO_TARGET, SEVERAL_TARGETS}
    assert np.isfinite(result.history[0]["train_loss"])
    every = GroundingModel.from_checkpoint(result.best_dir, device="cpu", score_thresh=0.0)
    apply_grounding_model(ds, every, label_field="every", prompt_field="expression")
    assert [len(d) for d in ds.values("every.detections")] == [10] * len(ds)
    confidences = ds.values("every.detections.confidence")
    assert all(c == sorted(c, reverse=True) for c in confidences)  # the most confident first
    nothing = GroundingModel.from_checkpoint(result.best_dir, device="cpu", score_thresh=1.0)
    ds.apply_model(nothing, label_field="nothing", prompt_field="expression")
    assert [len(d.detections) for d in ds.values("nothing")] == [0] * len(ds)

    # phrase search: the images where the phrase finds nothing above the threshold sort last
    from fiftyone_grounding.inference.search import search_phrase

    phrase = "all the red shapes"
    tops = [max(c) for c in search_phrase(ds, phrase, every, label_field="found", use_cache=False,
                                          progress=False).values("found.detections.confidence")]
    some = every.with_options(score_thresh=float(np.median(tops)))
    ranked = search_phrase(ds, phrase, some, label_field="found_some", use_cache=False, progress=False)
    counts = [len(d.detections) for d in ranked.values("found_some")]
    first_empty = counts.index(0)
    assert 0 < first_empty and all(counts[:first_empty]) and not any(counts[first_empty:])


def test_multi_box_confidences_are_calibrated_to_the_scorers_matches():
    """matched_queries flags the queries gRefCOCO's scorer would match (greedy, GIoU >= 0.5, each
    true box once: a duplicate is not matched); a checkpoint's calibration maps every query's
    confidence logit, so the score threshold applies to the calibrated confidence."""
    import torch

    from fiftyone_grounding.models.calibration import Calibration
    from fiftyone_grounding.inference.model import GroundingModel
    from fiftyone_grounding.models.build import build_model
    from fiftyone_grounding.engine.metrics import matched_queries

    truth = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]])
    queries = torch.tensor([[[0.1, 0.1, 0.4, 0.4], [0.12, 0.1, 0.4, 0.42], [0.0, 0.0, 0.05, 0.05],
                             [0.52, 0.5, 0.9, 0.88]],
                            [[0.1, 0.1, 0.4, 0.4]] * 4])
    flags = matched_queries(queries, [truth, torch.zeros(0, 4)])
    assert flags.tolist() == [[1.0, 0.0, 0.0, 1.0], [0.0] * 4]

    torch.manual_seed(0)
    model = GroundingModel(build_model("tiny-fusion-multi"), device="cpu", score_thresh=0.0)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    raw = model.predict(image, "the red circle").detections
    model.model.calibration = Calibration("platt", a=1.0, b=-50.0)  # every confidence near 0
    assert [d.confidence for d in model.predict(image, "the red circle").detections] == \
        pytest.approx([0.0] * len(raw), abs=1e-12)
    assert len(model.with_options(score_thresh=0.5).predict(image, "the red circle").detections) == 0


# -- the thresholds the stored boxes answer ---------------------------------------------------------------


def test_a_sweep_has_no_rows_below_the_confidence_the_boxes_were_written_from():
    """Below ``written_from`` every rate is None (not a copy of the row at it); at and above it
    the rows are those of the unrestricted sweep."""
    expressions = [Expression.of([A, B], [0.9, 0.75], [A, B]), Expression.of([C], [0.8], [], True),
                   Expression.of([A], [0.95], [A])]
    free = threshold_sweep(expressions)
    bound = threshold_sweep(expressions, written_from=0.7)
    for row, plain in zip(bound, free):
        if row["score_thresh"] < 0.7:
            assert not row["answered"] and row["pr_f1"] is row["n_acc"] is row["t_acc"] is None
            assert row["count"] == plain["count"] and row["no_target"] == plain["no_target"]
        else:
            assert row == plain and row["answered"]
    assert grec_metrics(expressions, 0.3 * 1.0, written_from=0.1 * 3)["answered"]  # rounding is not a gap


def _phrases_dataset(name):
    """Six phrases (no, one and two true boxes) with hand-made boxes: ``at_07`` as a model applied
    at 0.7 writes them, ``at_03`` as the same model applied at 0.3 (its boxes >= 0.7 the same)."""
    import fiftyone as fo

    def dets(*pairs):
        return fo.Detections(detections=[fo.Detection(label="referent", bounding_box=[x0, y0, x1 - x0, y1 - y0],
                                                      confidence=c) for (x0, y0, x1, y1), c in pairs])

    rows = [  # (truth, boxes >= 0.7, boxes in [0.3, 0.7))
        ([A], [(A, 0.9)], []),
        ([A, B], [(A, 0.95)], [(B, 0.55)]),  # the second box is found from 0.5 down
        ([A, C], [(A, 0.9)], [(C, 0.6)]),
        ([], [], [(C, 0.35)]),  # a box on a phrase of nothing from 0.35 down
        ([], [], []),
        ([B], [(B, 0.8)], [(C, 0.45)]),
    ]
    ds = fo.Dataset(name)
    ds.add_samples([fo.Sample(filepath=f"/img/{i}.jpg", expression=f"phrase {i}", no_target=not truth,
                              ground_truth=dets(*[(t, None) for t in truth]), at_07=dets(*high),
                              at_03=dets(*high, *low))
                    for i, (truth, high, low) in enumerate(rows)])
    return ds


def test_evaluate_grec_scores_only_the_thresholds_the_recorded_apply_answers(dataset_name):
    """A field written at 0.7 (its record says so): the 0.5 row is None, not a copy of the 0.7
    row; the same model applied at 0.3: the 0.5 row is real and differs. The table says why."""
    from fiftyone_grounding.evaluation.tables import format_grec_table
    from fiftyone_grounding.evaluation.scoring import evaluate_grec
    from fiftyone_grounding.runs import record_labels

    ds = _phrases_dataset(dataset_name)
    record_labels(ds, "at_07", "ckpt", prompt_field="expression", score_thresh=0.7, confidence_thresh=None)
    record_labels(ds, "at_03", "ckpt", prompt_field="expression", score_thresh=0.3, confidence_thresh=None)
    high, low = (evaluate_grec(ds, field, split_field=None) for field in ("at_07", "at_03"))
    assert (high["written_from"], high["written_from_source"]) == (0.7, "record")
    row = {r["score_thresh"]: r for r in high["sweep"]}
    assert row[0.5]["pr_f1"] is None and row[0.5]["n_acc"] is None and not row[0.5]["answered"]
    assert row[0.7]["pr_f1"] == pytest.approx(4 / 6) and high["overall"]["pr_f1"] == pytest.approx(4 / 6)
    copied = {r["score_thresh"]: r for r in evaluate_grec(ds, "at_07", split_field=None, applied_thresh=0.0,
                                                          write=False)["sweep"]}
    assert copied[0.5]["pr_f1"] == copied[0.7]["pr_f1"]  # what the sweep reported before: a copy

    lows = {r["score_thresh"]: r for r in low["sweep"]}
    assert all(r["answered"] for r in low["sweep"])
    # from 0.5 down phrases 1 and 2 find their second box; at 0.3 phrases 3 and 5 get a box too many
    assert lows[0.5]["pr_f1"] == pytest.approx(6 / 6) and lows[0.5]["pr_f1"] != lows[0.7]["pr_f1"]
    assert lows[0.3]["n_acc"] == 0.5 and lows[0.3]["pr_f1"] == pytest.approx(4 / 6)
    assert low["overall"] == high["overall"]  # at 0.7 both fields hold the same boxes

    table = format_grec_table(high)
    assert "0.5: -" in table and "0.7: 0.6667" in table
    assert "written from confidence 0.7 (the field's record)" in table and "0.3, 0.4, 0.5, 0.6" in table
    assert "not scored" not in format_grec_table(low)


def test_evaluate_grec_below_the_written_threshold_scores_nothing_and_says_so(dataset_name):
    """Asked for 0.5 on boxes written from 0.7, the overall and per-sample F1 are None, not the
    0.7 figures; an explicit applied_thresh wins over the record."""
    from fiftyone_grounding.evaluation.tables import format_grec_table
    from fiftyone_grounding.evaluation.scoring import evaluate_grec
    from fiftyone_grounding.runs import record_labels

    ds = _phrases_dataset(dataset_name)
    record_labels(ds, "at_07", "ckpt", prompt_field="expression", score_thresh=0.7, confidence_thresh=None)
    result = evaluate_grec(ds, "at_07", split_field=None, score_thresh=0.5)
    assert result["overall"]["pr_f1"] is None and not result["overall"]["answered"]
    assert result["overall"]["count"] == 6 and ds.values("at_07_f1") == [None] * 6
    assert "Pr@F1=1" in format_grec_table(result) and "not scored" in format_grec_table(result)
    given = evaluate_grec(ds, "at_07", split_field=None, score_thresh=0.5, applied_thresh=0.5, write=False)
    assert (given["written_from"], given["written_from_source"]) == (0.5, "given") and given["overall"]["answered"]
    # a one-box model's record (no score threshold) with a confidence_thresh of 0.4
    record_labels(ds, "at_03", "ckpt", prompt_field="expression", score_thresh=None, confidence_thresh=0.4)
    assert evaluate_grec(ds, "at_03", split_field=None, write=False)["written_from"] == 0.4


def test_without_a_record_the_lowest_stored_confidence_bounds_the_sweep(dataset_name):
    """No record (FiftyOne's apply_model, imported boxes): the boxes answer the evaluation's own
    threshold and every threshold down to their lowest confidence, nothing below; boxes without
    confidences answer every threshold."""
    import fiftyone as fo

    from fiftyone_grounding.evaluation.scoring import evaluate_grec

    ds = _phrases_dataset(dataset_name)
    high = evaluate_grec(ds, "at_07", split_field=None, write=False)  # lowest stored: 0.8
    assert (high["written_from"], high["written_from_source"]) == (0.7, "assumed")
    assert [r["answered"] for r in high["sweep"]] == [False] * 4 + [True] * 3
    low = evaluate_grec(ds, "at_03", split_field=None, write=False)  # lowest stored: 0.35
    assert low["written_from"] == 0.35
    assert [r["score_thresh"] for r in low["sweep"] if not r["answered"]] == [0.3]
    for sample in ds.iter_samples(autosave=True):
        sample["plain"] = fo.Detections(detections=[d.copy() for d in sample.ground_truth.detections])
    plain = evaluate_grec(ds, "plain", split_field=None, write=False)
    assert plain["written_from"] == 0.0 and all(r["answered"] and r["pr_f1"] == 1.0 for r in plain["sweep"])


def test_every_apply_path_records_the_threshold_its_boxes_were_written_from(dataset_name, tmp_path):
    """apply_grounding_model records a multi-box model's score_thresh (None for a one-box model,
    with the confidence_thresh), and evaluate_grec reads it: a field applied at 0.3 has the rows
    of a field of every box from 0.3 up, the field applied at 0.7 none below 0.7. FiftyOne's own
    apply_model keeps no record: the sweep falls back to the stored confidences."""
    import torch

    from fiftyone_grounding.inference.apply import apply_grounding_model
    from fiftyone_grounding.evaluation.scoring import evaluate_grec
    from fiftyone_grounding.inference.model import GroundingModel
    from fiftyone_grounding.models.build import build_model
    from fiftyone_grounding.runs import written_from
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(dataset_name, num_images=12, out_dir=str(tmp_path), seed=3, several_fraction=0.5,
                                none_fraction=0.3, persistent=False, progress=False)
    torch.manual_seed(0)
    multi = GroundingModel(build_model("tiny-fusion-multi"), device="cpu", score_thresh=0.0)
    for field, thresh in (("every", 0.0), ("at_03", 0.3), ("at_07", 0.7)):
        apply_grounding_model(ds, multi.with_options(score_thresh=thresh), label_field=field,
                              prompt_field="expression", num_workers=0)
        assert written_from(ds, field) == thresh
    every, low, high = (evaluate_grec(ds, f, split_field=None, write=False) for f in ("every", "at_03", "at_07"))
    assert low["written_from_source"] == high["written_from_source"] == "record"
    for r_every, r_low, r_high in zip(every["sweep"], low["sweep"], high["sweep"]):
        assert r_low == r_every  # every row of the field applied at 0.3 is real
        assert r_high == (r_every if r_every["score_thresh"] >= 0.7 else {
            **r_every, "pr_f1": None, "n_acc": None, "t_acc": None, "answered": False})

    one_box = GroundingModel(build_model("tiny"), device="cpu")
    assert one_box.applied_score_thresh is None and multi.applied_score_thresh == 0.0
    apply_grounding_model(ds, one_box, label_field="one", prompt_field="expression", num_workers=0)
    assert written_from(ds, "one") == 0.0
    apply_grounding_model(ds, one_box, label_field="one_sure", prompt_field="expression", num_workers=0,
                          confidence_thresh=0.4)
    assert written_from(ds, "one_sure") == 0.4
    ds.apply_model(multi.with_options(score_thresh=0.7), label_field="fo_apply", prompt_field="expression")
    assert written_from(ds, "fo_apply") is None
    assert evaluate_grec(ds, "fo_apply", split_field=None, write=False)["written_from_source"] == "assumed"

