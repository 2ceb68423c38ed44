"""The RefCOCO importer, on a small dataset written in the exact schema of jxu124/refcoco.

The source is a real ``datasets.DatasetDict`` saved with ``save_to_disk``; the images are JPEGs
drawn here and named like COCO train2014 files; FiftyOne and its database are real.
"""

import argparse
import json
import os

import datasets
import pytest

import fiftyone as fo

from fiftyone_grounding.data.labels import expression_text
from fiftyone_grounding.sources.checks import COCO_CATEGORIES
from fiftyone_grounding.cli import add_import_refcoco_arguments, import_refcoco_from_args
from fiftyone_grounding.sources.importer import coco_zoo_request, import_refcoco, plan_zoo_request

from refcoco_files import IMAGES, REFS, UMD, UNC, coco_file, draw_images, make_source, raw_text, save

COUNTS = {"train": 8, "val": 3, "testA": 2, "testB": 1}
TOTAL = 14


@pytest.fixture
def source(tmp_path):
    return save(make_source(), tmp_path / "refcoco_hf")


@pytest.fixture
def images(tmp_path):
    return draw_images(tmp_path / "train2014")


def test_import_fields_boxes_and_metadata(source, images, dataset_name):
    dataset = import_refcoco("refcoco", source=source, images_dir=images, dataset_name=dataset_name)

    assert len(dataset) == TOTAL
    assert dataset.persistent
    assert dataset.count_values("split") == COUNTS
    assert dataset.count_sample_tags() == COUNTS
    record = dataset.info["refcoco"]
    assert record["name"] == "refcoco" and record["hub_id"] == "jxu124/refcoco"
    assert record["source"] == os.path.abspath(source)
    assert record["splits"] == ["train", "val", "testA", "testB"]
    assert record["last_import"]["added"] == TOTAL

    by_sent = {s.sent_id: s for s in dataset}
    assert sorted(by_sent) == list(range(TOTAL))
    for hf_split, ref_id, ann_id, image_id, category_id, box, sent_ids in REFS:
        width, height = IMAGES[image_id]
        x0, y0, x1, y1 = box
        expected_rel = [x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height]
        for sent_id in sent_ids:
            sample = by_sent[sent_id]
            assert sample.filepath == os.path.join(images, coco_file(image_id))
            assert sample.expression == raw_text(sent_id, category_id)
            assert (sample.split, sample.tags) == (UNC[hf_split], [UNC[hf_split]])
            assert (sample.image_id, sample.ref_id, sample.ann_id) == (image_id, ref_id, ann_id)
            assert sample.category == COCO_CATEGORIES[category_id]
            # Size comes from raw_image_info; nothing else was computed.
            assert (sample.metadata.width, sample.metadata.height) == (width, height)
            assert sample.metadata.size_bytes is None
            (det,) = sample.ground_truth.detections
            assert det.label == "referent" and det.expression == expression_text(sample.expression)
            assert det.bounding_box == pytest.approx(expected_rel, abs=1e-6)


def test_import_twice_adds_nothing(source, images, dataset_name):
    first = import_refcoco(source=source, images_dir=images, dataset_name=dataset_name)
    ids = sorted(first.values("id"))
    again = import_refcoco(source=source, images_dir=images, dataset_name=dataset_name)
    assert len(again) == TOTAL
    assert sorted(again.values("id")) == ids
    assert again.info["refcoco"]["last_import"]["added"] == 0
    assert again.info["refcoco"]["last_import"]["already_present"] == TOTAL


def test_max_samples_then_the_rest(source, images, dataset_name):
    dataset = import_refcoco(source=source, images_dir=images, dataset_name=dataset_name, max_samples=3)
    assert sorted(dataset.values("sent_id")) == [0, 1, 2]
    # max_samples limits the selection, not what is added, so repeating it adds nothing.
    dataset = import_refcoco(source=source, images_dir=images, dataset_name=dataset_name, max_samples=3)
    assert len(dataset) == 3
    dataset = import_refcoco(
        source=source, images_dir=images, dataset_name=dataset_name, splits=["val", "testB"]
    )
    assert dataset.count_values("split") == {"train": 3, "val": 3, "testB": 1}
    dataset = import_refcoco(source=source, images_dir=images, dataset_name=dataset_name)
    assert len(dataset) == TOTAL
    assert sorted(dataset.values("sent_id")) == list(range(TOTAL))


def test_broken_row_stops_import_and_a_rerun_resumes(tmp_path, images, dataset_name):
    # ref 2 (sent 5, the 6th expression) has x_max < x_min: the import stops when it reaches it.
    broken = [r if r[1] != 2 else (*r[:5], [70.0, 0.0, 10.0, 60.0], r[6]) for r in REFS]
    broken_source = save(make_source(broken), tmp_path / "broken")
    with pytest.raises(ValueError, match=r"row 2 \(ref_id 2\): bbox \[70.0, 0.0, 10.0, 60.0\]"):
        import_refcoco(source=broken_source, images_dir=images, dataset_name=dataset_name, chunk_size=2)

    # The chunks written before the broken row ([0, 1], [2, 3]) stay; the chunk holding it does not.
    dataset = fo.load_dataset(dataset_name)
    assert sorted(dataset.values("sent_id")) == [0, 1, 2, 3]
    kept = {s.sent_id: s.id for s in dataset}
    assert dataset.info["refcoco"]["name"] == "refcoco"

    fixed_source = save(make_source(), tmp_path / "fixed")
    dataset = import_refcoco(source=fixed_source, images_dir=images, dataset_name=dataset_name, chunk_size=2)
    assert len(dataset) == TOTAL
    assert sorted(dataset.values("sent_id")) == list(range(TOTAL))
    assert {s.sent_id: s.id for s in dataset if s.sent_id in kept} == kept
    assert dataset.info["refcoco"]["last_import"]["already_present"] == 4


def test_missing_images_stop_the_import_or_are_skipped(source, tmp_path, dataset_name):
    images = draw_images(tmp_path / "partial", [i for i in IMAGES if i != 25])
    report = tmp_path / "reports" / "missing.txt"
    with pytest.raises(FileNotFoundError) as info:
        import_refcoco(
            source=source, images_dir=images, dataset_name=dataset_name, missing_report=str(report)
        )
    message = str(info.value)
    assert "1 of the 5 images" in message and "(3 expressions)" in message
    assert coco_file(25) in message and str(report) in message and "skip_missing=True" in message
    assert report.read_text() == coco_file(25) + "\n"
    assert not fo.dataset_exists(dataset_name)  # stopped before writing anything

    report.unlink()
    dataset = import_refcoco(
        source=source,
        images_dir=images,
        dataset_name=dataset_name,
        missing_report=str(report),
        skip_missing=True,
    )
    assert len(dataset) == TOTAL - 3
    assert not set(dataset.values("sent_id")) & {5, 6, 7}
    last = dataset.info["refcoco"]["last_import"]
    assert (last["missing_images"], last["skipped_missing_image"]) == (1, 3)
    assert last["missing_report"] == str(report)
    assert report.read_text() == coco_file(25) + "\n"


def test_missing_columns_and_bad_names_fail_clearly(source, images, dataset_name):
    dsd = datasets.load_from_disk(source)
    dsd["validation"] = dsd["validation"].remove_columns(["bbox", "raw_image_info"])
    with pytest.raises(
        ValueError, match=r"split 'validation' lacks the column\(s\) \['raw_image_info', 'bbox'\]; the importer "
        r"expects \[.*\], the columns of jxu124/refcoco at revision 'main'.*--revision"
    ):
        import_refcoco(source=dsd, images_dir=images, dataset_name=dataset_name)
    # The other splits do not need the broken one.
    dataset = import_refcoco(source=dsd, images_dir=images, dataset_name=dataset_name, splits=["train"])
    assert len(dataset) == COUNTS["train"]

    with pytest.raises(ValueError, match="Unknown refcoco split 'dev'"):
        import_refcoco(source=source, images_dir=images, dataset_name=dataset_name, splits=["dev"])
    with pytest.raises(ValueError, match="Unknown RefCOCO variant"):
        import_refcoco("refcoco-x", source=source)
    with pytest.raises(ValueError, match="not a folder written by save_to_disk"):
        import_refcoco(source=str(images) + "-nowhere")
    # sent_ids of the variants overlap, so one dataset must hold one variant.
    with pytest.raises(ValueError, match="holds refcoco, not refcoco\\+"):
        import_refcoco("refcoco+", source=source, images_dir=images, dataset_name=dataset_name)


def test_inconsistent_columns_fail_clearly(images, dataset_name):
    dsd = make_source()
    # A source whose bbox were COCO xywh instead of xyxy disagrees with raw_anns.
    dsd["testB"] = dsd["testB"].map(lambda r: {"bbox": json.loads(r["raw_anns"])["bbox"]})
    with pytest.raises(ValueError, match=r"bbox \[3.0, 3.0, 34.0, 27.0\] \(xyxy\) disagrees with raw_anns"):
        import_refcoco(source=dsd, images_dir=images, dataset_name=dataset_name, splits=["testB"])
    # A row filed under another split.
    dsd["validation"] = dsd["validation"].map(lambda r: {"split": "train"})
    with pytest.raises(ValueError, match="split column says 'train' but the row is in split 'validation'"):
        import_refcoco(source=dsd, images_dir=images, dataset_name=dataset_name, splits=["val"])


def test_a_row_whose_sent_ids_disagree_or_repeat_is_skipped_counted_and_the_import_goes_on(
        tmp_path, images, dataset_name, capsys):
    """Rows whose expressions cannot be told apart are skipped and counted in the summary: sent_ids
    in another order than the sentences, a sent_id that an earlier row holds, one that repeats in
    its own row. Every other row imports, and a rerun skips the same rows again."""
    refs = [r if r[1] != 5 else (*r[:6], [9]) for r in REFS]  # ref 5 repeats ref 4's sent_id 9
    refs = [r if r[1] != 7 else (*r[:6], [13, 13]) for r in refs]  # ref 7 lists sent_id 13 twice
    dsd = make_source(refs)
    dsd["test"] = dsd["test"].map(lambda r: {"sent_ids": r["sent_ids"][::-1]})  # ref 6: [12, 11]
    path = save(dsd, tmp_path / "refcoco_bad")
    dataset = import_refcoco(source=path, images_dir=images, dataset_name=dataset_name)
    assert sorted(dataset.values("sent_id")) == list(range(10))  # refs 0-4 whole
    assert dataset.count_values("split") == {"train": 8, "val": 2}
    assert dataset.info["refcoco"]["splits"] == ["train", "val"]
    last = dataset.info["refcoco"]["last_import"]
    assert (last["added"], last["skipped_bad_refs"], last["skipped_bad_ref_expressions"]) == (10, 3, 5)
    reasons = " | ".join(last["bad_refs"])
    assert "split 'validation' row 1: sent_id(s) [9] occur more than once in the source" in reasons
    assert "split 'testB' row 0: sent_id(s) [13] occur more than once" in reasons
    assert "split 'test' row 0 (ref_id 6): the sent_ids of sentences [11, 12] differ from the sent_ids column " \
           "[12, 11]" in reasons
    texts = dict(zip(dataset.values("sent_id"), dataset.values("expression")))
    assert texts[9] == raw_text(9, 44)  # the first row of sent_id 9 keeps it

    parser = argparse.ArgumentParser()
    add_import_refcoco_arguments(parser)
    assert import_refcoco_from_args(parser.parse_args(["refcoco", "--source", path, "--images-dir", images,
                                            "--dataset-name", dataset_name, "--no-progress"])) == 0
    out = capsys.readouterr().out
    assert "This run added 0; 10 were already present." in out
    assert "Skipped 3 refs (5 expressions) whose sent_ids disagree with their sentences or repeat" in out


def test_partial_source_and_empty_expression(images, dataset_name):
    dsd = make_source()
    # An expression with no text is skipped and counted; the rest of its row imports.
    first, *rest = dsd["validation"]["sentences"][0]
    dsd["validation"] = dsd["validation"].map(
        lambda r, i: {"sentences": [{**first, "raw": " ", "sent": ""}, *rest]} if i == 0 else {},
        with_indices=True,
    )
    only_val = datasets.DatasetDict({"validation": dsd["validation"]})
    dataset = import_refcoco(source=only_val, images_dir=images, dataset_name=dataset_name)
    assert dataset.count_values("split") == {"val": 2}
    assert sorted(dataset.values("sent_id")) == [9, 10]
    assert dataset.info["refcoco"]["last_import"]["skipped_empty"] == 1


def test_hub_unreachable_says_what_to_do():
    # conftest sets HF_DATASETS_OFFLINE=1, as on a machine without network.
    with pytest.raises(RuntimeError, match=r"'jxu124/refcocog' \(revision 'main'\).*save_to_disk\(PATH\)`.*pass source=PATH"):
        import_refcoco("refcocog")
    with pytest.raises(RuntimeError, match=r"'jxu124/refcocog' \(revision 'v2'\)"):
        import_refcoco("refcocog", revision="v2")


def test_zoo_request_names_exactly_the_needed_images(source, images, dataset_name):
    assert coco_zoo_request([25, 9, 9]) == {"name": "coco-2014", "split": "train", "image_ids": [9, 25]}
    assert plan_zoo_request(source=source, dataset_name=dataset_name)["image_ids"] == [9, 25, 30, 42, 49]
    assert plan_zoo_request(source=source, dataset_name=dataset_name, max_samples=3)["image_ids"] == [9]
    assert plan_zoo_request(source=source, dataset_name=dataset_name, splits=["testA"])["image_ids"] == [42]

    # Once image 9's expressions are in, it is not asked for again.
    import_refcoco(source=source, images_dir=images, dataset_name=dataset_name, max_samples=5)
    request = plan_zoo_request(source=source, dataset_name=dataset_name)
    assert request == {"name": "coco-2014", "split": "train", "image_ids": [25, 30, 42, 49]}


def test_import_through_the_coco_zoo_folder(source, tmp_path, dataset_name, monkeypatch):
    # FiftyOne's coco-2014 zoo reads the train2014 annotations from <zoo>/coco-2014/raw and only
    # downloads images missing from <zoo>/coco-2014/train/data; with both in place it runs offline.
    zoo = tmp_path / "zoo"
    monkeypatch.setattr(fo.config, "dataset_zoo_dir", str(zoo))
    data_dir = draw_images(zoo / "coco-2014" / "train" / "data")
    images = [
        {
            "id": i,
            "file_name": coco_file(i),
            "width": w,
            "height": h,
            "coco_url": f"http://images.cocodataset.org/train2014/{coco_file(i)}",
        }
        for i, (w, h) in IMAGES.items()
    ]
    (zoo / "coco-2014" / "raw").mkdir(parents=True)
    (zoo / "coco-2014" / "raw" / "instances_train2014.json").write_text(
        json.dumps(
            {
                "images": images,
                "annotations": [],
                "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
            }
        )
    )

    dataset = import_refcoco(source=source, dataset_name=dataset_name)
    assert len(dataset) == TOTAL
    assert {os.path.dirname(p) for p in dataset.values("filepath")} == {data_dir}


def test_refcocog_split_names(tmp_path, images, dataset_name):
    refs = [r if r[0] != "testB" else ("test", *r[1:]) for r in REFS]
    source = save(make_source(refs, UMD), tmp_path / "refcocog_hf")
    dataset = import_refcoco("refcocog", source=source, images_dir=images, dataset_name=dataset_name)
    assert dataset.count_sample_tags() == {"train": 8, "val": 3, "test": 3}
    assert dataset.info["refcoco"]["splits"] == ["train", "val", "test"]
    assert dataset.info["refcoco"]["hub_id"] == "jxu124/refcocog"


def test_cli_helpers(source, images, dataset_name, capsys):
    parser = argparse.ArgumentParser(prog="fiftyone-grounding import-refcoco")
    add_import_refcoco_arguments(parser)
    assert "save_to_disk" in parser.format_help() and "--skip-missing" in parser.format_help()
    args = parser.parse_args(
        [
            "refcoco",
            "--source",
            source,
            "--images-dir",
            images,
            "--dataset-name",
            dataset_name,
            "--splits",
            "val",
            "testA",
        ]
    )
    assert import_refcoco_from_args(args) == 0
    assert fo.load_dataset(dataset_name).count_values("split") == {"val": 3, "testA": 2}
    out = capsys.readouterr().out
    assert "5 expressions (val 3, testA 2)" in out and "This run added 5" in out
