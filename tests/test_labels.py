"""Labels: the scheme (one label, the phrase as an attribute), the database form written in bulk,
confidence thresholds, and the migration of datasets written with the old scheme."""

import fiftyone as fo
import pytest

from fiftyone_grounding.data.fields import DEFAULT_LABEL
from fiftyone_grounding.data.labels import (LabelMaker, detection_xyxy, detections_doc, expression_text,
                                            make_detections, migrate_label_scheme, valid_detection_xyxy)

CASES = [
    ([0.1, 0.2, 0.5, 0.6], "the cat on the sofa", 1.0),
    ([-0.3, 0.25, 1.4, 0.75], "  a box   out of the image ", 0.5),  # clipped, phrase normalized
    ([0.0, 0.0, 1.0, 1.0], "x" * 300, None),  # long phrase cut, no confidence
]


def _without_ids(doc: dict) -> dict:
    return {**doc, "detections": [{k: v for k, v in d.items() if k != "_id"} for d in doc["detections"]]}


@pytest.mark.parametrize("box, expression, confidence", CASES)
def test_the_database_form_equals_what_fiftyone_serializes(box, expression, confidence):
    doc = detections_doc(box, expression, confidence=confidence)
    reference = make_detections(box, expression, confidence=confidence).to_mongo().to_dict()
    assert _without_ids(doc) == _without_ids(reference)
    # and FiftyOne reads it as that label
    label = fo.Detections.from_dict(doc)
    assert detection_xyxy(label.detections[0].bounding_box) == pytest.approx(
        detection_xyxy(make_detections(box, expression).detections[0].bounding_box))
    det = label.detections[0]
    assert det.label == DEFAULT_LABEL and det.confidence == confidence
    assert det.expression == expression_text(expression) == " ".join(expression.split())[:200]
    assert det.id == str(doc["detections"][0]["_id"])


def test_a_stored_box_reads_back_as_the_clipped_box_and_a_non_box_as_none():
    label = make_detections([-0.2, 0.25, 0.5, 1.5], "the cat")  # stored clipped to the image
    assert detection_xyxy(label.detections[0].bounding_box) == pytest.approx([0.0, 0.25, 0.5, 1.0])
    assert valid_detection_xyxy(label.detections[0].bounding_box) == pytest.approx([0.0, 0.25, 0.5, 1.0])
    for not_a_box in (None, [], [0.1, 0.2, 0.3]):
        assert detection_xyxy(not_a_box) is None and valid_detection_xyxy(not_a_box) is None
    assert detection_xyxy([0.1, 0.2, 0.0, 0.3]) == pytest.approx([0.1, 0.2, 0.1, 0.5])  # read, but no area
    assert valid_detection_xyxy([0.1, 0.2, 0.0, 0.3]) is None
    assert valid_detection_xyxy([0.1, float("nan"), 0.2, 0.3]) is None


def test_database_form_labels_written_in_bulk_read_back_as_fiftyone_labels(dataset_name):
    ds = fo.Dataset(dataset_name)
    ds.add_samples([fo.Sample(filepath=f"/tmp/fog-labels-{i}.jpg") for i in range(len(CASES))])
    ds.add_sample_field("pred", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    ids = ds.values("id")
    docs = {sid: detections_doc(*case) for sid, case in zip(ids, CASES)}
    ds.set_values("pred", docs, key_field="id", validate=False)

    ds.add_sample_field("ref", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    ds.set_values("ref", [make_detections(*case) for case in CASES])
    for sample, (box, expression, confidence) in zip(ds.iter_samples(), CASES):
        assert isinstance(sample.pred, fo.Detections)
        pred, ref = sample.pred.detections[0], sample.ref.detections[0]
        assert (pred.label, pred.bounding_box, pred.confidence, pred.expression) == (
            ref.label, ref.bounding_box, ref.confidence, ref.expression)
        assert pred.id == str(docs[sample.id]["detections"][0]["_id"])
    # the App and evaluation see them as labels: label ids are indexed, views filter them
    assert ds.count("pred.detections") == len(CASES)
    assert len(ds.filter_labels("pred", fo.ViewField("confidence") > 0.7)) == 1
    assert ds.get_field_schema()["pred"].document_type is fo.Detections
    # FiftyOne's evaluation matches them box by box and writes its results onto each label
    results = ds.evaluate_detections("pred", gt_field="ref", eval_key="e", iou=0.99)
    assert (results.metrics()["precision"], results.metrics()["recall"]) == (1.0, 1.0)
    assert ds.count_values("pred.detections.e") == {"tp": len(CASES)}
    assert results.classes.tolist() == [DEFAULT_LABEL]  # one class, whatever the phrases


def test_a_confidence_threshold_drops_boxes_the_fiftyone_way():
    """Below the threshold, or without a confidence, the box is dropped and the sample keeps an
    empty Detections, as FiftyOne's apply_model(confidence_thresh=...) does."""
    maker = LabelMaker(confidence_thresh=0.5)
    kept, dropped, unscored = (maker.detections([0.1, 0.1, 0.4, 0.4], "the cat", c) for c in (0.5, 0.49, None))
    assert len(kept.detections) == 1 and dropped.detections == [] and unscored.detections == []
    assert maker.doc([0.1, 0.1, 0.4, 0.4], "the cat", 0.2) == {"_cls": "Detections", "detections": []}
    assert len(LabelMaker().detections([0.1, 0.1, 0.4, 0.4], "the cat", None).detections) == 1
    assert LabelMaker(label="phrase").doc([0, 0, 1, 1], "x", 0.9)["detections"][0]["label"] == "phrase"


def test_old_scheme_datasets_migrate_once(dataset_name):
    """The phrase as the label (the earlier scheme) moves to the expression attribute."""
    ds = fo.Dataset(dataset_name)
    phrases = ["the red circle", "the  blue square on the left", None]
    old = [fo.Detections(detections=[fo.Detection(label=p, bounding_box=[0.1, 0.1, 0.2, 0.2])]) if p else None
           for p in phrases]
    ds.add_samples([fo.Sample(filepath=f"/tmp/fog-migrate-{i}.png", expression=p, ground_truth=d,
                              predictions=d.copy() if d else None) for i, (p, d) in enumerate(zip(phrases, old))])
    changed = migrate_label_scheme(ds)
    assert changed == {"ground_truth": 2, "predictions": 2}
    for field in ("ground_truth", "predictions"):
        assert ds.values(f"{field}.detections.label") == [[DEFAULT_LABEL], [DEFAULT_LABEL], None]
        assert ds.values(f"{field}.detections.expression") == [["the red circle"], ["the blue square on the left"],
                                                               None]
        assert ds.has_field(f"{field}.detections.expression")  # declared: the App lists and filters it
    assert migrate_label_scheme(ds) == {"ground_truth": 0, "predictions": 0}
    with pytest.raises(ValueError, match=r"\['expression'\] are not Detections fields"):
        migrate_label_scheme(ds, fields=["expression"])
