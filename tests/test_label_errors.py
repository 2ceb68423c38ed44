"""Label errors: honest predictions (image-disjoint folds; a checkpoint never scores what it
trained on), the injected errors, the score's classifier and prior, the ranking it gives on a
small synthetic set, the review answers, and the operator and CLI that run it."""

import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
import pytest

import fiftyone as fo

from fiftyone_grounding.data.records import read_records
from fiftyone_grounding.errors import InputError
from fiftyone_grounding.evaluation.flagging import at_budget, average_precision, flagging_metrics
from fiftyone_grounding.models.boxes import box_iou
from fiftyone_grounding.qa import combine, inject
from fiftyone_grounding.qa.folds import _fold_splits, image_folds
from fiftyone_grounding.inference.distributed import Shard
from fiftyone_grounding.qa.label_errors import (SUSPECT_TAG, calibrate_label_errors, compute_label_errors,
                                                score_label_errors)
from fiftyone_grounding.qa.review import mark_right, review_precision, use_model_box


def test_folds_never_share_an_image_and_each_fold_model_trains_on_the_other_folds_only(synthetic_dataset):
    records = read_records(synthetic_dataset)
    folds = image_folds(records.filepaths, 3, seed=0)
    by_image = {}
    for path, fold in zip(records.filepaths, folds):
        by_image.setdefault(path, set()).add(int(fold))
    assert all(len(f) == 1 for f in by_image.values())  # an image's phrases in one fold
    sizes = np.bincount([next(iter(f)) for f in by_image.values()])
    assert sizes.max() - sizes.min() <= 1
    for fold in range(3):
        splits = _fold_splits(records, folds, fold, seed=0)
        trained = {p for sid, p in zip(records.sample_ids, records.filepaths) if splits[sid] in ("train", "val")}
        held = {p for p, f in zip(records.filepaths, folds) if f == fold}
        assert trained and held and not trained & held
        assert {splits[sid] for sid, f in zip(records.sample_ids, folds) if f == fold} == {"held_out"}


def test_injected_errors_are_what_they_say():
    records = inject.GroundingRecords(
        sample_ids=["a", "b", "c", "d"], filepaths=["1", "1", "2", "2"],
        phrases=["the red circle", "the blue square", "the green triangle", "the white circle"],
        boxes=[[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9], [0.1, 0.5, 0.4, 0.8], [0.5, 0.1, 0.8, 0.4]],
        categories=["red circle", "blue square", "green triangle", "white circle"])
    rng = np.random.default_rng(0)
    images = inject._Images(records)
    moved = inject._corrupt(images, 0, "wrong_object", rng)
    assert list(moved.box) == records.boxes[1] and moved.phrase == records.phrases[0]
    swapped = inject._corrupt(images, 0, "swapped_phrase", rng)
    assert swapped.phrase == records.phrases[1] and list(swapped.box) == records.boxes[0]
    absent = inject._corrupt(images, 0, "no_target", rng)
    assert absent.phrase in records.phrases[2:]  # a phrase of the other image: no such object here
    for _ in range(20):
        bad = inject._corrupt(images, 0, "bad_box", rng)
        assert 0.05 < float(box_iou(np.asarray(bad.box), np.asarray(records.boxes[0]))) < 0.8
    both, kinds = inject.with_corrupted_copies(records, [moved, absent])
    assert kinds == ["", "", "", "", "wrong_object", "no_target"]
    assert both.sample_ids[4:] == ["a", "a"] and both.phrases[5] == absent.phrase and both.boxes[:4] == records.boxes
    # an image with one object cannot take a moved box or a swapped phrase: another kind is drawn
    lone = inject.GroundingRecords(sample_ids=["x"], filepaths=["9"], phrases=["the red circle"],
                                   boxes=[[0.1, 0.1, 0.3, 0.3]], categories=["red circle"])
    assert [c.kind for c in inject.plan_corruptions(lone, [0], rng)] == ["bad_box"]


def test_the_error_rate_is_the_mixture_proportion_and_the_mean_probability_matches_it():
    """Blanchard, Lee & Scott (2010): annotations whose scores mix 10% of the copies' distribution
    with right annotations that mostly score lower; the smallest tail ratio recovers the 10% (an
    upper bound, tight where some errors score above every right annotation), and the shifted
    probabilities average to it."""
    rng = np.random.default_rng(0)
    copies = rng.beta(5, 1.5, 4000)
    mixed = np.concatenate([rng.beta(5, 1.5, 400), rng.beta(1.5, 6, 3600)])
    rate = combine.mixture_proportion(mixed, copies)
    assert rate == pytest.approx(0.1, abs=0.02)
    logit = np.log(mixed / (1 - mixed))
    shift = combine._shift_to_mean(logit, rate)
    assert combine._sigmoid(logit + shift).mean() == pytest.approx(rate, abs=1e-6)


def test_flagging_metrics_against_hand_counts():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    kinds = ["bad_box", "", "no_target", "", "", ""]
    assert average_precision(scores, [k != "" for k in kinds]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert at_budget(scores, [k != "" for k in kinds], 0.5) == (pytest.approx(2 / 3), 1.0)
    m = flagging_metrics(scores, kinds)
    assert m["overall"]["auroc"] == pytest.approx((4 + 3) / 8)
    assert m["bad_box"]["auroc"] == 1.0 and m["no_target"]["auroc"] == pytest.approx(3 / 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on the clean train split of 1,000 synthetic images, and the dataset."""
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset
    from fiftyone_grounding.engine.fit import fit

    name = "fog-label-errors"
    dataset = make_synthetic_dataset(name, num_images=1000, out_dir=str(tmp_path_factory.mktemp("le")), seed=5,
                                     overwrite=True, persistent=False, progress=False)
    run = fit(dataset, preset="tiny", out_dir=str(tmp_path_factory.mktemp("le_run")), epochs=8, lr=7e-4,
              batch_size=32, progress=False, cpu=True)
    yield dataset, run.best_dir
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


def test_a_checkpoint_scores_only_what_it_did_not_train_on_and_ranks_injected_errors_first(trained):
    """The train split (and any image it holds) is left out and counted; on the rest, with 15%
    errors of the four kinds injected, the wrong annotations rank above the right ones."""
    dataset, checkpoint = trained
    view = dataset.match_tags(["val", "test"])
    records = read_records(view)
    rng = np.random.default_rng(1)
    corruptions = inject.plan_corruptions(records, inject.choose_rows(records, 0.15, rng), rng)
    inject.write_corruptions(view, records, corruptions)
    said = []
    result = compute_label_errors(dataset, model=checkpoint, progress=False, say=said.append)
    assert dataset.match_tags("train").exists("label_error").count() == 0
    assert result.scored == len(view)
    assert list(result.skipped.values()) == [len(dataset.match_tags("train"))]
    assert "skipped" in said[-1]
    kinds = {sid: "" for sid in records.sample_ids}
    kinds.update({records.sample_ids[c.index]: c.kind for c in corruptions})
    scored = dataset.exists("label_error")
    ids, scores = scored.values("id"), scored.values("label_error")
    metrics = flagging_metrics(scores, [kinds[i] for i in ids])
    print("AUROC", metrics["overall"]["auroc"], metrics["overall"]["ap"])
    assert metrics["overall"]["auroc"] > 0.7, metrics
    assert set(scored.distinct("label_error_kind")) <= {"wrong_object", "bad_box", "no_target", "ambiguous"}
    assert set(scored.distinct("label_error_driver")) <= set(combine.PARTS)
    assert 0 < result.error_rate < 0.5
    suspects = dataset.match_tags(SUSPECT_TAG)
    assert len(suspects) == result.suspects and min(suspects.values("label_error"), default=1) >= 0.5
    first = result.view.first()
    assert first.label_error == max(scores) and len(first.label_error_box.detections) == 1
    assert dataset.has_run("label_errors_label_error")

    # Two ranks' (or operator tasks') score steps, each on its share of the images, then one
    # calibration of the whole view: the signals of one process (to float32 rounding: other
    # batches), and from them the same ranking. The calibration is deterministic given the
    # signals, but its classifier's fit carries that rounding into the third decimal of P(wrong).
    one = dict(zip(ids, scores))
    signals = dict(zip(*dataset.exists("label_error_signals").values(["id", "label_error_signals"])))
    parts = [score_label_errors(dataset, checkpoint, distributed=Shard(rank, 2), progress=False, say=said.append)
             for rank in (0, 1)]
    assert sum(p["scored"] for p in parts) == len(view) and min(p["scored"] for p in parts) > 0
    assert sum(p["left_out"] for p in parts) == len(dataset.match_tags("train"))
    again_signals = dict(zip(*dataset.exists("label_error_signals").values(["id", "label_error_signals"])))
    assert again_signals.keys() == signals.keys()
    for sid, values in signals.items():
        for name, value in values.items():
            np.testing.assert_allclose(np.asarray(again_signals[sid][name], dtype=float),
                                       np.asarray(value, dtype=float), atol=1e-5, err_msg=name)
    again = calibrate_label_errors(dataset, checkpoint, progress=False, say=said.append)
    two = dict(zip(*dataset.exists("label_error").values(["id", "label_error"])))
    assert again.scored == len(view) and two.keys() == one.keys()
    assert spearmanr([two[k] for k in one], list(one.values())).statistic > 0.98
    rerun = flagging_metrics([two[i] for i in ids], [kinds[i] for i in ids])["overall"]["auroc"]
    assert abs(rerun - metrics["overall"]["auroc"]) < 0.02


def test_the_review_answers_write_what_they_say(synthetic_dataset, dataset_name, tiny_checkpoint):
    dataset = synthetic_dataset.limit(12).clone(dataset_name)
    compute_label_errors(dataset, model=tiny_checkpoint, progress=False, say=lambda line: None)
    a, b = dataset.values("id")[:2]
    dataset.select([a, b]).tag_samples(SUSPECT_TAG)
    assert review_precision(dataset)["precision"] is None
    before = dataset[a].ground_truth.detections[0].bounding_box
    model_box = dataset[a].label_error_box.detections[0].bounding_box
    assert use_model_box(dataset, a) == pytest.approx(model_box)
    fixed = dataset[a].ground_truth.detections[0]
    assert fixed.bounding_box == pytest.approx(model_box) and fixed["previous_bounding_box"] == pytest.approx(before)
    mark_right(dataset, b)
    assert dataset[b].label_error_reviewed == "ok"
    assert review_precision(dataset) == {"reviewed": 2, "fixed": 1, "ok": 1, "precision": 0.5}
    with pytest.raises(InputError, match="No sample"):
        mark_right(dataset.limit(1), b)


def test_folds_score_every_sample_with_a_model_that_did_not_see_its_image(synthetic_dataset, dataset_name,
                                                                           grounding_plugin_dir,
                                                                           tmp_path):
    """k-fold scoring through the operator (scheduled from Python as the App would run it at once):
    every sample scored by its own fold's model, which never trained on its image."""
    import fiftyone.operators as foo


    dataset = synthetic_dataset.clone(dataset_name)
    op = foo.get_operator("@fiftyone-grounding/grounding/find_label_errors")
    ran = op(dataset, how="folds", preset="tiny", folds=2, epochs=1).result
    assert ran["scored"] == len(dataset)
    folds = image_folds(read_records(dataset).filepaths, 2, seed=0)
    assert dataset.values("label_error_fold") == folds.tolist()
    # each fold's model scored exactly the samples its run held out, none of whose images it trained on
    checkpoints = dataset.get_run_info("label_errors_label_error").config.checkpoints
    assert len(checkpoints) == 2
    for fold, checkpoint in enumerate(checkpoints):
        held = json.loads((Path(checkpoint).parent / "held_out.json").read_text())
        assert held["fold"] == fold
        assert set(held["sample_ids"]) == set(dataset.match(fo.ViewField("label_error_fold") == fold).values("id"))
        held_images = set(dataset.select(held["sample_ids"]).values("filepath"))
        trained = dataset.exclude(held["sample_ids"])
        assert not held_images & set(trained.values("filepath"))
    saved = ran["saved_view"]
    assert dataset.load_saved_view(saved).first().label_error == max(dataset.values("label_error"))
    # a second run on the same view reuses the fold models (the same folds: the same folders)
    again = op(dataset, how="folds", preset="tiny", folds=2, epochs=1).result
    assert dataset.get_run_info("label_errors_label_error").config.checkpoints == checkpoints
    assert again["scored"] == len(dataset)
    # a view whose folds differ trains new fold models instead of reusing ones that saw its samples
    op(dataset.skip(2), how="folds", preset="tiny", folds=2, epochs=1)
    assert set(dataset.get_run_info("label_errors_label_error").config.checkpoints).isdisjoint(checkpoints)


def test_small_views_score_and_impossible_requests_say_what_to_do(synthetic_dataset, dataset_name, tiny_checkpoint):
    dataset = synthetic_dataset.limit(3).clone(dataset_name)
    result = compute_label_errors(dataset, model=tiny_checkpoint, progress=False, say=lambda line: None)
    assert result.scored == 3 and 0 <= result.error_rate <= 1
    assert sum(result.fitted_on[k] for k in inject.KINDS if k in result.fitted_on) >= 20  # several copies each
    with pytest.raises(InputError, match="5 folds need at least 5 images"):
        compute_label_errors(dataset, preset="tiny", folds=5)


def test_the_cli_scores_a_split_and_bad_requests_get_one_sentence(cli, synthetic_dataset, dataset_name,
                                                                 tiny_checkpoint):
    dataset = synthetic_dataset.clone(dataset_name)
    code, out, err = cli("label-errors", "--dataset", dataset_name, "--checkpoint", str(tiny_checkpoint), "--split",
                         "test", "--no-progress")
    assert code == 0 and "Scored" in out and dataset.match_tags("test").exists("label_error").count() == len(
        dataset.match_tags("test"))
    code, out, err = cli("label-errors", "--dataset", dataset_name, "--preset", "tiny", "--folds", "1")
    assert code == 2 and err.startswith("error: folds must be") and "Traceback" not in err
    with pytest.raises(InputError, match="Give model= "):
        compute_label_errors(dataset)


def test_a_multi_box_model_judges_a_given_box_by_its_best_confidence_times_iou():
    import torch

    from fiftyone_grounding.models.build import build_model
    from fiftyone_grounding.qa.signals import _batch_signals

    torch.manual_seed(0)
    model = build_model("tiny-fusion-multi", weights=False).eval()
    ids = torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), ids, torch.ones_like(ids)).clipped()
        given = out.query_boxes[:, 3]  # a box the model itself proposes: at least that query's confidence
        scores = model.given_box_scores(out, given)
        conf = out.box_confidences()
        expected = (conf * box_iou(out.query_boxes, given[:, None])).amax(-1)
        assert torch.allclose(scores, expected) and (scores >= conf[:, 3] - 1e-6).all()
        signals = _batch_signals(model, out, given)
    assert torch.allclose(signals["confidence"], conf.amax(-1))
    assert torch.isfinite(signals["ambiguity"]).all() and torch.isfinite(signals["exists"]).all()


def test_average_precision_is_scikit_learns_with_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 5, 60).astype(float)  # many ties
        positive = rng.random(60) < 0.3
        assert average_precision(scores, positive) == pytest.approx(average_precision_score(positive, scores))
    # a budget that cuts a tie: the tied group's share of positives
    assert at_budget([1.0, 0.5, 0.5, 0.5, 0.5], [True, True, False, False, False], 0.4) == (
        pytest.approx((1 + 0.25) / 2), pytest.approx(1.25 / 2))
