"""Labels: the FiftyOne objects and the database form written in bulk are the same label."""

import fiftyone as fo
import pytest

from fiftyone_grounding.labels import detections_doc, first_box_xyxy, label_for, make_detections

CASES = [
    ([0.1, 0.2, 0.5, 0.6], "the cat on the sofa", 1.0),
    ([-0.3, 0.25, 1.4, 0.75], "  a box   out of the image ", 0.5),  # clipped, label normalized
    ([0.0, 0.0, 1.0, 1.0], "x" * 300, None),  # long label cut, no confidence
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
    assert first_box_xyxy(label) == pytest.approx(first_box_xyxy(make_detections(box, expression)))
    assert label.detections[0].label == label_for(expression) and label.detections[0].confidence == confidence
    assert label.detections[0].id == str(doc["detections"][0]["_id"])


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
        assert (pred.label, pred.bounding_box, pred.confidence) == (ref.label, ref.bounding_box, ref.confidence)
        assert pred.id == str(docs[sample.id]["detections"][0]["_id"])
    # the App and evaluation see them as labels: label ids are indexed, views filter them
    assert ds.count("pred.detections") == len(CASES)
    assert len(ds.filter_labels("pred", fo.ViewField("confidence") > 0.7)) == 1
    assert ds.get_field_schema()["pred"].document_type is fo.Detections
    # FiftyOne's evaluation matches them box by box and writes its results onto each label
    results = ds.evaluate_detections("pred", gt_field="ref", eval_key="e", iou=0.99)
    assert (results.metrics()["precision"], results.metrics()["recall"]) == (1.0, 1.0)
    assert ds.count_values("pred.detections.e") == {"tp": len(CASES)}
