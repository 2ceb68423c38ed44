"""Phrase search over a dataset, and the grounding panel's work on one sample (``search.py``)."""

import math

import numpy as np
import pytest

import fiftyone as fo
import fiftyone.operators as foo

from fiftyone_grounding.data.cache import find_feature_cache
from fiftyone_grounding.models.build import build_model
from fiftyone_grounding.models.config import get_config
from fiftyone_grounding.data.fields import GROUNDED_FIELD, PREVIEW_FIELD
from fiftyone_grounding.errors import InputError
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.app.streaming import shown_results
from fiftyone_grounding.runs import checkpoint_of
from fiftyone_grounding.inference.search import clear_box, ground_in_sample, keep_box, search_phrase
from fiftyone_grounding.data.cache import default_feature_cache_dir

PHRASE = "the red circle"


@pytest.fixture
def dataset(synthetic_dataset, dataset_name):
    return synthetic_dataset.clone(dataset_name)


@pytest.fixture
def model(tiny_checkpoint):
    return GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")


def _confidences(view, field):
    return [max(c) if c else None for c in view.values(f"{field}.detections.confidence")]


def test_search_ranks_every_image_by_its_confidence_and_reads_the_training_cache(dataset, model, tmp_path,
                                                                                  count_forwards):
    """Every image gets the phrase's box with its confidence; the view comes back most confident
    first, the unreadable image (no box) last; each image is encoded once (two phrases share
    one); the cached features that training left give the boxes the pixels give."""
    broken = fo.Sample(filepath=str(tmp_path / "missing.png"), expression="x")
    dataset.add_sample(broken)
    images = len(set(dataset.values("filepath")))
    assert images < len(dataset)  # the synthetic set has two phrases per image

    forwards = count_forwards(model)
    ranked = search_phrase(dataset, PHRASE, model, label_field="cold", batch_size=8, use_cache=False,
                           progress=False)
    # batches of 8 phrases (an image's two in one batch, the image encoded once); the missing file never batched
    assert forwards.calls == math.ceil((len(dataset) - 1) / 8)
    confidences = _confidences(ranked, "cold")
    assert sorted(ranked.values("id")) == sorted(dataset.values("id"))
    assert confidences[-1] is None and ranked.last().id == broken.id
    scored = confidences[:-1]
    assert None not in scored and scored == sorted(scored, reverse=True) and scored[0] > scored[-1]
    assert set(ranked.distinct("cold.detections.expression")) == {PHRASE}
    # the samples of one image get the same box
    by_path = {}
    for path, box in zip(*dataset.values(["filepath", "cold.detections.bounding_box"])):
        by_path.setdefault(path, []).append(box)
    assert all(len({str(b) for b in boxes}) == 1 for boxes in by_path.values())

    # the same boxes as one prompt applied the FiftyOne way
    dataset.apply_model(model.with_options(prompt=PHRASE), label_field="applied", batch_size=8)
    np.testing.assert_allclose(np.array(dataset.exists("cold").values("cold.detections.bounding_box"), float),
                               np.array(dataset.exists("cold").values("applied.detections.bounding_box"), float),
                               atol=1e-5)
    assert checkpoint_of(dataset, "cold") == model.source

    # training cached this model's features (conftest's fit): read from there, nothing decoded
    assert find_feature_cache(default_feature_cache_dir(), model.model) is not None
    warm = search_phrase(dataset, PHRASE, model, label_field="warm", batch_size=8, progress=False)
    cold_boxes = dict(zip(dataset.values("id"), dataset.values("cold.detections.bounding_box")))
    warm_ids, warm_boxes = warm.values(["id", "warm.detections.bounding_box"])
    for sid, box in zip(warm_ids, warm_boxes):
        if cold_boxes[sid] is None:
            assert box is None
        else:  # float16 features
            np.testing.assert_allclose(box, cold_boxes[sid], atol=2e-2)


def test_search_keeps_the_confident_boxes_and_needs_a_phrase_and_a_confidence(dataset, model, tmp_path):
    view = dataset.limit(10)
    ranked = search_phrase(view, PHRASE, model, label_field="sure", confidence_thresh=2.0, use_cache=False,
                           progress=False)
    assert ranked.count("sure.detections") == 0 and len(ranked) == 10
    with pytest.raises(InputError, match="The phrase is empty"):
        search_phrase(view, "   ", model)
    loss_weights = {k: v for k, v in get_config("tiny").loss_weights.items() if k not in ("quality", "judge", "exist")}
    no_head = GroundingModel(build_model("tiny", quality_head=False, presence_head=False, loss_weights=loss_weights),
                             device="cpu")
    with pytest.raises(InputError, match="has no confidence"):
        search_phrase(view, PHRASE, no_head)


def test_the_search_operator_writes_the_boxes_and_opens_the_ranked_view(dataset, tiny_checkpoint,
                                                                        grounding_plugin_dir):
    view = dataset.limit(12)
    execution = foo.execute_operator("@fiftyone-grounding/grounding/search_phrase", ctx={"view": view, "params": {
        "phrase": PHRASE, "model": str(tiny_checkpoint), "label_field": "found"}})
    results = shown_results(execution)
    assert results["num_boxes"] == 12 and results["sort_by"] == "found.detections.confidence"
    assert results["top_confidence"] == pytest.approx(max(_confidences(view, "found")))
    requests = execution.executor.to_json()["requests"]
    set_view = [r for r in requests if r["operator_uri"] == "set_view"]
    assert set_view, [r["operator_uri"] for r in requests]
    opened = fo.DatasetView._build(dataset, set_view[-1]["params"]["view"])
    assert _confidences(opened, "found") == sorted(_confidences(view, "found"), reverse=True)


def test_the_panel_grounds_one_sample_keeps_its_box_beside_others_and_clears_it(dataset, model):
    first, second = dataset.limit(2).values("id")
    result = ground_in_sample(dataset, first, PHRASE, model, gt_field="ground_truth")
    sample = dataset[first]
    preview = sample[PREVIEW_FIELD].detections
    assert result["boxes"] == len(preview) == 1 and preview[0].expression == PHRASE
    assert result["confidence"] == pytest.approx(preview[0].confidence)
    assert 0.0 <= result["iou"] <= 1.0
    assert dataset[second][PREVIEW_FIELD] is None  # only the current sample
    assert checkpoint_of(dataset, PREVIEW_FIELD) is None  # a preview is not a recorded result

    assert keep_box(dataset, first, model.source) == 1
    ground_in_sample(dataset, first, "the blue square", model)
    assert keep_box(dataset, first, model.source) == 2  # beside the first phrase's box
    ground_in_sample(dataset, first, PHRASE, model)
    assert keep_box(dataset, first, model.source) == 2  # the same phrase: replaced
    sample = dataset[first]
    assert sorted(d.expression for d in sample[GROUNDED_FIELD].detections) == ["the blue square", PHRASE]
    assert sample[PREVIEW_FIELD] is None and checkpoint_of(dataset, GROUNDED_FIELD) == model.source
    with pytest.raises(InputError, match="no box to keep"):
        keep_box(dataset, first, model.source)

    assert ground_in_sample(dataset, second, PHRASE, model)["iou"] is None  # no ground truth asked for
    clear_box(dataset, second)
    assert dataset[second][PREVIEW_FIELD] is None
    with pytest.raises(InputError, match="No sample"):
        ground_in_sample(dataset, "0" * 24, PHRASE, model)
