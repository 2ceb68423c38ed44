"""Ref-L4's human review joined onto imported RefCOCO samples, with real FiftyOne and files.

The reviewed files are written in their real schema (MDETR's COCO-style refexp format with
``caption_quality`` on each annotation: ``images[]`` one row per expression with the COCO image
id as ``original_id`` and REFER's ``sent`` as ``caption``; ``annotations[]`` with the row's
``image_id``, the COCO ``ann_id`` as ``original_id``), from the same refs the importer reads.
"""

import argparse
import json
import uuid

import fiftyone as fo
import pytest
from huggingface_hub import constants

from fiftyone_grounding.cli import add_import_refcoco_arguments, import_refcoco_from_args
from fiftyone_grounding.errors import DownloadError, InputError, SourceError
from fiftyone_grounding.sources import ref_l4
from fiftyone_grounding.sources.importer import import_refcoco
from fiftyone_grounding.sources.ref_l4 import QUALITY_FIELD, WRONG_FIELD, join_ref_l4, load_ref_l4

from refcoco_files import IMAGES, REFS, UNC, draw_images, make_row, make_source, save

WRONG_SENT_IDS = {9, 12}  # val: ref 4's second sentence; testA: ref 6's second sentence
EVAL_SENT_IDS = {8, 9, 10, 11, 12, 13}  # every val/testA/testB expression of REFS
EXTRA_ANN_ID = 999  # a reviewed entry that no imported sample has


def reviewed_payload(refs, extra=None):
    """One reviewed file as Ref-L4 ships it (MDETR's refexp format plus caption_quality)."""
    images, annotations = [], []
    next_row = 1000  # the file's own row ids, unlike the COCO ids
    rows = [make_row(UNC, *ref) for ref in refs] + ([extra] if extra else [])
    for row in rows:
        ann = json.loads(row["raw_anns"])
        width, height = IMAGES.get(row["image_id"], (64, 64))
        for sentence in row["sentences"]:
            images.append({
                "file_name": f"COCO_train2014_{row['image_id']:012d}.jpg", "height": height, "width": width,
                "id": next_row, "original_id": row["image_id"], "caption": sentence["sent"],
                "dataset_name": "refcoco", "tokens_negative": [[0, 3]],
            })
            annotations.append({
                "area": ann["area"], "iscrowd": 0, "image_id": next_row, "category_id": row["category_id"],
                "id": next_row + 5000, "bbox": ann["bbox"], "original_id": row["ann_id"],
                "tokens_positive": [[4, 9]],
                "caption_quality": 0 if sentence["sent_id"] in WRONG_SENT_IDS else 1,
            })
            next_row += 1
    return {"info": {"description": "refcoco"}, "licenses": [{"id": 1, "name": "CC BY-NC 4.0"}],
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person", "supercategory": "person"}]}


def write_reviewed(folder):
    """refcoco_{val,testA,testB}_reviewed.json under folder/refcocos_annotation_reviewed/."""
    inner = folder / ref_l4.FOLDER
    inner.mkdir(parents=True)
    extra = make_row(UNC, "validation", 99, EXTRA_ANN_ID, 30, 1, [1.0, 1.0, 9.0, 9.0], [77])
    by_split = {"val": [r for r in REFS if r[0] == "validation"], "testA": [r for r in REFS if r[0] == "test"],
                "testB": [r for r in REFS if r[0] == "testB"]}
    for split, refs in by_split.items():
        payload = reviewed_payload(refs, extra if split == "val" else None)
        (inner / ref_l4.file_name("refcoco", split)).write_text(json.dumps(payload))
    # RefCOCO+ files beside them, which a refcoco dataset does not read
    (inner / ref_l4.file_name("refcoco+", "val")).write_text(json.dumps(reviewed_payload(by_split["val"])))
    return folder


@pytest.fixture
def refcoco(tmp_path, dataset_name):
    source = save(make_source(), tmp_path / "refcoco_hf")
    images = draw_images(tmp_path / "train2014")
    dataset = import_refcoco("refcoco", source=source, images_dir=images, dataset_name=dataset_name,
                             progress=False)
    return dataset, source, images


@pytest.fixture
def reviewed(tmp_path):
    return write_reviewed(tmp_path / "ref-l4")


def by_sent_id(dataset):
    return dict(zip(dataset.values("sent_id"), zip(dataset.values(QUALITY_FIELD), dataset.values(WRONG_FIELD))))


def test_join_writes_the_review_on_exactly_the_reviewed_samples(refcoco, reviewed, capsys):
    dataset, _, _ = refcoco
    counts = join_ref_l4(dataset, source=reviewed, progress=False)

    assert {k: counts[k] for k in ("entries", "matched", "wrong", "not_reviewed", "entries_without_sample")} == \
        {"entries": 7, "matched": 6, "wrong": 2, "not_reviewed": 8, "entries_without_sample": 1}
    assert counts["files"] == ["refcoco_val_reviewed.json", "refcoco_testA_reviewed.json",
                               "refcoco_testB_reviewed.json"]
    values = by_sent_id(dataset)
    for sent_id, (quality, wrong) in values.items():
        if sent_id in EVAL_SENT_IDS:
            assert (quality, wrong) == ((0, True) if sent_id in WRONG_SENT_IDS else (1, False)), sent_id
        else:  # the train split: not reviewed, left alone
            assert (quality, wrong) == (None, None), sent_id
    assert dataset.count_values(WRONG_FIELD) == {True: 2, False: 4, None: 8}
    assert set(dataset.match(fo.ViewField(WRONG_FIELD)).values("sent_id")) == WRONG_SENT_IDS
    assert dataset.info["ref_l4"]["matched"] == 6
    assert "CC BY-NC 4.0" in dataset.info["ref_l4"]["licence"]

    # on a view: only its samples are counted and written
    dataset.set_values(QUALITY_FIELD, [None] * len(dataset))
    counts = join_ref_l4(dataset.match_tags("testA"), source=reviewed, dataset_name="refcoco", progress=False)
    assert (counts["matched"], counts["wrong"], counts["not_reviewed"], counts["entries_without_sample"]) == \
        (2, 1, 0, 5)
    assert {s for s, q in zip(dataset.values("sent_id"), dataset.values(QUALITY_FIELD)) if q is not None} == {11, 12}


def test_import_refcoco_with_ref_l4_and_the_cli_flag(refcoco, reviewed, tmp_path, capsys):
    _, source, images = refcoco
    name = f"fog-test-{uuid.uuid4().hex[:10]}"
    try:
        dataset = import_refcoco("refcoco", source=source, images_dir=images, dataset_name=name,
                                 splits=["train", "val"], progress=False, ref_l4=str(reviewed))
        assert dataset.info["ref_l4"]["matched"] == 3 and dataset.info["ref_l4"]["wrong"] == 1
        assert {s: v for s, v in by_sent_id(dataset).items() if v != (None, None)} == \
            {8: (1, False), 9: (0, True), 10: (1, False)}
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)

    parser = argparse.ArgumentParser(prog="fiftyone-grounding import-refcoco")
    add_import_refcoco_arguments(parser)
    assert "--ref-l4" in parser.format_help()
    assert parser.parse_args(["refcoco", "--ref-l4"]).ref_l4 is True
    assert parser.parse_args(["refcoco"]).ref_l4 is None
    name = f"fog-test-{uuid.uuid4().hex[:10]}"
    try:
        args = parser.parse_args(["refcoco", "--source", source, "--images-dir", images, "--dataset-name", name,
                                  "--splits", "testA", "--no-progress", "--ref-l4", str(reviewed)])
        capsys.readouterr()
        assert import_refcoco_from_args(args) == 0
        assert "Ref-L4: 2 expressions reviewed, 1 marked wrong" in capsys.readouterr().out
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)

    # variants Ref-L4 did not review are refused before anything is imported
    with pytest.raises(InputError, match="not 'grefcoco'"):
        import_refcoco("grefcoco", source=str(tmp_path), ref_l4=str(reviewed))


def test_bad_files_name_the_file_and_what_is_wrong(refcoco, tmp_path):
    dataset, _, _ = refcoco
    folder = tmp_path / "bad"
    folder.mkdir()
    path = folder / "refcoco_val_reviewed.json"
    path.write_text("{not json")
    with pytest.raises(SourceError, match=r"refcoco_val_reviewed\.json: not a JSON file"):
        join_ref_l4(dataset, source=folder, progress=False)

    payload = reviewed_payload([r for r in REFS if r[0] == "validation"])
    del payload["annotations"][1]["caption_quality"]
    path.write_text(json.dumps(payload))
    with pytest.raises(SourceError, match=r"refcoco_val_reviewed\.json: annotations\[1\] lacks \['caption_quality'\]"):
        join_ref_l4(dataset, source=folder, progress=False)

    path.write_text(json.dumps({"images": []}))
    with pytest.raises(SourceError, match=r"refcoco_val_reviewed\.json: no list \['annotations'\]"):
        load_ref_l4(folder, ["refcoco"])

    with pytest.raises(SourceError, match="holds none of Ref-L4's reviewed files"):
        load_ref_l4(tmp_path / "bad", ["refcocog"])

    # a dataset that does not say which variant it holds
    plain = fo.Dataset()
    try:
        with pytest.raises(InputError, match="pass dataset_name="):
            join_ref_l4(plain, source=folder, progress=False)
    finally:
        plain.delete()


def test_the_hub_offline_with_an_empty_cache_says_what_to_do(refcoco, tmp_path, monkeypatch):
    dataset, _, _ = refcoco
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as conftest sets it: a machine without network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DownloadError) as caught:
        join_ref_l4(dataset, progress=False)
    message = str(caught.value)
    assert message.startswith("The Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is set): could not download "
                              "Ref-L4's reviewed RefCOCO files ('JierunChen/Ref-L4', refcocos_annotation_reviewed/")
    assert "snapshot_download('JierunChen/Ref-L4', repo_type='dataset'" in message
    assert "pass source=FOLDER" in message and "--ref-l4 FOLDER" in message and "\n" not in message
    assert QUALITY_FIELD not in dataset.get_field_schema()


def test_same_text_twice_pairs_in_order_and_the_licence_is_printed_once(tmp_path, dataset_name, monkeypatch, capsys):
    """Two sentences of one object with the same text pair with the file's entries in sent_id
    order; ``raw`` text matches the file's ``sent`` (case, punctuation and spacing aside)."""
    dataset = fo.Dataset(dataset_name)
    dataset.info["refcoco"] = {"name": "refcocog"}
    dataset.add_samples([
        fo.Sample(filepath=f"/x/{i}.jpg", split=split, image_id=image_id, ann_id=ann_id, sent_id=sent_id,
                  expression=text)
        for i, (split, image_id, ann_id, sent_id, text) in enumerate([
            ("test", 5, 50, 7, "The man, on the LEFT."),
            ("test", 5, 50, 3, "the man on the left"),
            ("test", 5, 50, 4, "A man's hat"),
            ("val", 5, 50, 9, "a man's hat"),  # another split: not this file's entry
        ])
    ])
    folder = tmp_path / "g"
    folder.mkdir()
    rows = [(5, 50, "the man on the left", 0), (5, 50, "the man on the left", 1), (5, 50, "a man s hat", 1)]
    payload = {
        "images": [{"id": i, "original_id": image_id, "caption": caption} for i, (image_id, _, caption, _) in
                   enumerate(rows)],
        "annotations": [{"id": 10 + i, "image_id": i, "original_id": ann_id, "caption_quality": q}
                        for i, (_, ann_id, _, q) in enumerate(rows)],
    }
    (folder / "refcocog_test_reviewed.json").write_text(json.dumps(payload))
    monkeypatch.setattr(ref_l4, "_licence_told", False)
    capsys.readouterr()

    counts = join_ref_l4(dataset, source=folder, progress=False)
    assert (counts["matched"], counts["wrong"], counts["not_reviewed"], counts["entries_without_sample"]) == \
        (3, 1, 1, 0)
    assert counts["missing_files"] == ["refcocog_val_reviewed.json"]
    assert by_sent_id(dataset) == {3: (0, True), 7: (1, False), 4: (1, False), 9: (None, None)}
    join_ref_l4(dataset, source=folder, progress=False)
    assert capsys.readouterr().out.count(ref_l4.LICENCE) == 1


def test_refcocox_samples_join_by_their_source_variant(reviewed, dataset_name):
    dataset = fo.Dataset(dataset_name)
    dataset.info["refcoco"] = {"name": "refcocox"}
    val = make_row(UNC, "validation", *REFS[4][1:])  # ref 4: sent_ids 8 (kept) and 9 (wrong)
    dataset.add_samples([
        fo.Sample(filepath=f"/x/{variant}{s['sent_id']}.jpg", split=f"{variant}/val", source=variant,
                  image_id=val["image_id"], ann_id=val["ann_id"], sent_id=s["sent_id"], expression=s["raw"])
        for variant in ("refcoco", "refcoco+", "refcocog") for s in val["sentences"]
    ])
    counts = join_ref_l4(dataset, source=reviewed, progress=False)
    # refcoco's val, testA, testB and refcoco+'s val files exist; refcocog's none of them
    assert counts["files"] == ["refcoco_val_reviewed.json", "refcoco_testA_reviewed.json",
                               "refcoco_testB_reviewed.json", "refcoco+_val_reviewed.json"]
    assert (counts["entries"], counts["matched"], counts["wrong"], counts["not_reviewed"]) == (7 + 3, 4, 2, 2)
    got = dict(zip(zip(dataset.values("source"), dataset.values("sent_id")), dataset.values(WRONG_FIELD)))
    assert got == {("refcoco", 8): False, ("refcoco", 9): True, ("refcoco+", 8): False, ("refcoco+", 9): True,
                   ("refcocog", 8): None, ("refcocog", 9): None}


def test_the_label_error_benchmark_scores_against_ref_l4s_marks(refcoco, reviewed, tiny_checkpoint, tmp_path,
                                                                 capsys):
    """``benchmarks/label_errors.py --ref-l4``: the product's score on the reviewed samples, against
    Ref-L4's wrong marks (the same metrics as on injected errors)."""
    import importlib.util
    import sys
    from pathlib import Path

    dataset, _, _ = refcoco
    join_ref_l4(dataset, source=reviewed, progress=False)
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        spec = importlib.util.spec_from_file_location("label_errors_benchmark", benchmarks / "label_errors.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = tmp_path / "ref_l4.json"
        module.main(["--ref-l4", "--dataset", dataset.name, "--checkpoint", str(tiny_checkpoint), "--json", str(out),
                     "--no-progress", "--device", "cpu"])
    finally:
        sys.path.remove(str(benchmarks))
    result = json.loads(out.read_text())["results"]["ref-l4"]
    assert (result["samples"], result["errors"]) == (6, 2)
    overall = result["product"]["overall"]
    assert overall["count"] == 2 and 0 <= overall["auroc"] <= 1
    assert "ref-l4 | product" in capsys.readouterr().out
