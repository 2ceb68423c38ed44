"""The data sources besides jxu124: the original REFER files, gRefCOCO, RefCOCO-M and refcocox.

Every source is written in its real schema (by ``refcoco_files.py``, RefCOCO-M here): REFER's
``refs(unc).p`` as a pickle of plain dicts (protocol 2, as Python 2 wrote it) beside a COCO
``instances.json``; gRefCOCO's ``grefs(unc).json``; RefCOCO-M as a FiftyOne Hub-format folder (a
``FiftyOneDataset`` export with ``fiftyone.yml``). Images are JPEGs drawn there; FiftyOne and its
database are real; no network.
"""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo
from fiftyone import ViewField as F

from fiftyone_grounding.engine.config import TrainConfig
from fiftyone_grounding.data.records import read_records
from fiftyone_grounding.errors import DownloadError, SourceError
from fiftyone_grounding.evaluation.fiftyone_run import GroundingEvaluationConfig, evaluate_in_fiftyone
from fiftyone_grounding.evaluation.tables import format_table
from fiftyone_grounding.evaluation.scoring import evaluate_grounding
from fiftyone_grounding.sources.importer import import_refcoco
from fiftyone_grounding.sources.refer import load_refs_pickle
from fiftyone_grounding.engine.fit import fit

from refcoco_files import (IMAGES, REF_KEYS, REFS, UNC, coco_file, draw_images, make_row, make_source, save,
                           write_grefcoco, write_instances, write_refer)

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture
def images(tmp_path):
    return draw_images(tmp_path / "train2014")


# ---------------------------------------------------------------- REFER


def _by_sent(dataset):
    fields = ["filepath", "expression", "split", "tags", "image_id", "ref_id", "ann_id", "category",
              "metadata.width", "metadata.height", "ground_truth.detections.label",
              "ground_truth.detections.expression", "ground_truth.detections.bounding_box"]
    values = dataset.values(["sent_id"] + fields)
    return {row[0]: row[1:] for row in zip(*values)}


def test_refer_folder_gives_the_samples_of_the_jxu124_copy(tmp_path, images, dataset_name):
    refer = write_refer(tmp_path / "refer" / "refcoco")
    jxu = save(make_source(), tmp_path / "refcoco_hf")
    a = import_refcoco("refcoco", source=refer, images_dir=images, dataset_name=dataset_name)
    b = import_refcoco("refcoco", source=jxu, images_dir=images, dataset_name=dataset_name + "-hf")
    try:
        left, right = _by_sent(a), _by_sent(b)
        assert sorted(left) == sorted(right) == list(range(14))
        for sent_id, row in left.items():
            *same, boxes = row
            *same_hf, boxes_hf = right[sent_id]
            assert same == same_hf
            assert np.allclose(boxes, boxes_hf, rtol=0, atol=1e-12)
        assert a.info["refcoco"]["format"] == "refer" and a.info["refcoco"]["splits"] == ["train", "val", "testA", "testB"]
        assert set(a.get_field_schema()) == set(b.get_field_schema())
        # The release's data/ folder (refcoco/, refcoco+/, ...) works too, and a re-import adds nothing.
        again = import_refcoco("refcoco", source=tmp_path / "refer", images_dir=images, dataset_name=dataset_name)
        assert again.info["refcoco"]["last_import"]["added"] == 0 and len(again) == 14
    finally:
        fo.delete_dataset(dataset_name + "-hf")


def test_refcocog_refer_uses_umd_and_refuses_the_google_split(tmp_path, images, dataset_name):
    refs = [r if r[0] != "testB" else ("test", *r[1:]) for r in REFS]
    umd = {"train": "train", "validation": "val", "test": "test"}
    folder = write_refer(tmp_path / "refcocog", refs, umd, "refs(umd).p")
    write_refer(folder, refs, umd, "refs(google).p")  # the release has both; umd is read
    dataset = import_refcoco("refcocog", source=folder, images_dir=images, dataset_name=dataset_name)
    assert dataset.count_sample_tags() == {"train": 8, "val": 3, "test": 3}
    os.remove(os.path.join(folder, "refs(umd).p"))
    with pytest.raises(SourceError, match=r"has only refs\(google\).p: the Google partition .* shares images"):
        import_refcoco("refcocog", source=folder, images_dir=images, dataset_name=dataset_name)


def load_refs_pickle_of(data: bytes) -> list:
    return pickle.loads(data)  # the test's own, trusted pickle


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Plain:
    pass


def test_the_refs_unpickler_runs_nothing_and_refuses_classes_and_truncated_files(tmp_path, images, dataset_name):
    marker = tmp_path / "ran"
    folder = write_refer(tmp_path / "refcoco")
    refs_path = os.path.join(folder, "refs(unc).p")
    good = open(refs_path, "rb").read()
    payloads = {
        "code": pickle.dumps([{"ref_id": 0, "sentences": _RunsCode(marker)}], protocol=2),
        "instance": pickle.dumps([_Plain()], protocol=4),
    }
    for kind, payload in payloads.items():
        with open(refs_path, "wb") as f:
            f.write(payload)
        with pytest.raises(SourceError, match=r"asks to load .*refused and nothing from it was run") as error:
            import_refcoco("refcoco", source=folder, images_dir=images, dataset_name=dataset_name)
        assert ("posix.system" in str(error.value)) == (kind == "code"), str(error.value)
        assert not marker.exists()
    with pytest.raises(SourceError, match="asks to load"):
        load_refs_pickle(refs_path)

    with open(refs_path, "wb") as f:
        pickle.dump([{**load_refs_pickle_of(good)[0], "ann_id": "100"}], f, protocol=2)
    with pytest.raises(SourceError, match=r"ref 0 ref_id and image_id must be integers, ann_id"):
        import_refcoco("refcoco", source=folder, images_dir=images, dataset_name=dataset_name)

    with open(refs_path, "wb") as f:
        f.write(good[: len(good) // 2])
    with pytest.raises(SourceError, match="is not a whole refs pickle .* it may be truncated"):
        import_refcoco("refcoco", source=folder, images_dir=images, dataset_name=dataset_name)
    assert not fo.dataset_exists(dataset_name)

    # Corrupted and cut files: each loads as refs or is one SourceError, never another exception.
    rng = np.random.default_rng(0)
    for i in range(400):
        data = bytearray(good[: rng.integers(1, len(good))] if i % 2 else good)
        for at in rng.integers(0, len(data), 3):
            data[at] = rng.integers(0, 256)
        with open(refs_path, "wb") as f:
            f.write(data)
        try:
            load_refs_pickle(refs_path)
        except SourceError:
            pass


def test_a_broken_refer_ref_stops_the_import_and_a_rerun_resumes(tmp_path, images, dataset_name):
    folder = write_refer(tmp_path / "refcoco")
    refs = load_refs_pickle(os.path.join(folder, "refs(unc).p"))
    broken = [dict(r, ann_id=999) if r["ref_id"] == 2 else r for r in refs]
    with open(os.path.join(folder, "refs(unc).p"), "wb") as f:
        pickle.dump(broken, f, protocol=2)
    with pytest.raises(SourceError, match=r"ref 2 \(ref_id 2\): ann_id 999 is not in .*instances.json"):
        import_refcoco("refcoco", source=folder, images_dir=images, dataset_name=dataset_name, chunk_size=2)
    assert sorted(fo.load_dataset(dataset_name).values("sent_id")) == [0, 1, 2, 3]
    write_refer(folder)
    dataset = import_refcoco("refcoco", source=folder, images_dir=images, dataset_name=dataset_name, chunk_size=2)
    assert len(dataset) == 14 and dataset.info["refcoco"]["last_import"]["already_present"] == 4


# ---------------------------------------------------------------- gRefCOCO


def test_a_refer_ref_whose_sent_ids_disagree_or_repeat_is_skipped_and_counted(tmp_path, images, dataset_name):
    """In the refs pickle (read by the strict unpickler, as released): a ref whose sent_ids are in
    another order than its sentences, one whose sentences repeat a sent_id, one that repeats an
    earlier ref's sent_id are skipped and counted; the other refs import."""
    rows = [make_row(UNC, *ref) for ref in REFS]
    refs = [{k: r[k] for k in REF_KEYS} for r in rows]
    refs[1]["sent_ids"] = [2, 4, 3]  # sentences 2, 3, 4
    refs[3]["sentences"] = [dict(refs[3]["sentences"][0]), dict(refs[3]["sentences"][0])]  # sent_id 6 twice
    refs[5]["sent_ids"], refs[5]["sentences"][0]["sent_id"] = [8], 8  # ref 4 holds sent_id 8
    folder = tmp_path / "refer" / "refcoco"
    write_instances(folder, [json.loads(r["raw_anns"]) for r in rows])
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    dataset = import_refcoco("refcoco", source=str(folder), images_dir=images, dataset_name=dataset_name)
    assert sorted(dataset.values("sent_id")) == [0, 1, 5, 8, 9, 11, 12, 13]
    last = dataset.info["refcoco"]["last_import"]
    assert (last["added"], last["skipped_bad_refs"], last["skipped_bad_ref_expressions"]) == (8, 3, 6)
    reasons = " | ".join(last["bad_refs"])
    assert "sent_ids of sentences [2, 3, 4] differ from the sent_ids column [2, 4, 3]" in reasons
    assert "sent_ids of sentences [6, 6] differ from the sent_ids column [6, 7]" in reasons
    assert "split 'val' ref 1: sent_id(s) [8] occur more than once in the source" in reasons


def test_grefcoco_keeps_zero_one_or_several_boxes_and_one_box_models_skip_and_count(tmp_path, images,
                                                                                     dataset_name):
    folder = write_grefcoco(tmp_path / "grefcoco")
    dataset = import_refcoco("grefcoco", source=folder, images_dir=images, dataset_name=dataset_name)
    assert len(dataset) == 6 and dataset.count_sample_tags() == {"train": 3, "val": 2, "testA": 1}
    by_sent = {s.sent_id: s for s in dataset}
    assert [len(by_sent[i].ground_truth.detections) for i in range(6)] == [1, 1, 3, 0, 0, 2]
    assert [by_sent[i].no_target for i in range(6)] == [False, False, False, True, True, False]
    three = by_sent[2]
    assert three.ann_ids == [501, 502, 503] and three.categories == ["person", "person", "dog"]
    assert {d.label for d in three.ground_truth.detections} == {"referent"}
    assert {d.expression for d in three.ground_truth.detections} == {"all people and the dog"}
    assert three.ground_truth.detections[2].bounding_box == pytest.approx([60 / 96, 10 / 64, 30 / 96, 40 / 64])
    assert by_sent[3].ground_truth.detections == [] and by_sent[3].ann_ids == []
    assert dataset.info["refcoco"]["targets"] == {"none": 2, "one": 2, "several": 2}
    assert import_refcoco("grefcoco", source=folder, images_dir=images,
                          dataset_name=dataset_name).info["refcoco"]["last_import"]["added"] == 0

    records = read_records(dataset)
    assert sorted(records.phrases) == ["Man on the left", "left person"]
    reasons = sorted(reason for _, reason in records.skipped)
    assert reasons == ["no target (the phrase refers to nothing): one-box models skip it"] * 2 + \
        ["several targets: one-box models skip them"] * 2

    # Evaluation scores the one-target samples only, and says why the others are not scored.
    for sample in dataset:
        sample["predictions"] = fo.Detections(detections=[fo.Detection(label="referent",
                                                                       bounding_box=[0.1, 0.1, 0.4, 0.6])])
        sample.save()
    result = evaluate_grounding(dataset, "predictions", print_table=False)
    assert result["overall"]["count"] == 2
    assert (result["unscored"], result["no_target"], result["several_targets"]) == (4, 2, 2)
    assert {k: m["count"] for k, m in result["splits"].items()} == {"train": 2, "val": 0, "testA": 0}
    assert "(2 samples have several true boxes: one-box models are not scored on them)" in format_table(result)
    # FiftyOne's own per-sample loop leaves the same samples out.
    # Phrases of no or several objects make it FiftyOne's COCO run; boxes without a confidence get no mAP.
    grec = evaluate_in_fiftyone(dataset, "predictions", eval_key="grec")
    assert grec["mAP"] is None and grec["grec"]["overall"]["count"] == 6 and "grec" in dataset.list_evaluations()
    assert dataset.get_run_info("eval_grec").config.metrics["n_acc"] == grec["grec"]["overall"]["n_acc"]
    dataset.delete_evaluation("grec")
    one_box = dataset.match(F("no_target") == False).match(F("ground_truth.detections").length() == 1)
    fast = evaluate_in_fiftyone(one_box, "predictions", eval_key="fast")
    one_box.evaluate_detections("predictions", "ground_truth", eval_key="slow", method=GroundingEvaluationConfig)
    assert one_box.values("fast_fn") == one_box.values("slow_fn") and sum(one_box.values("slow_fn")) + fast["tp"] == 2


def test_grefcoco_from_the_hub_unreachable_says_what_to_do(dataset_name):
    # conftest sets HF_HUB_OFFLINE=1, as on a machine without network.
    with pytest.raises(DownloadError, match=r"FudanCVL/gRefCOCO.*pass source=FOLDER"):
        import_refcoco("grefcoco", dataset_name=dataset_name)


# ---------------------------------------------------------------- RefCOCO-M


def write_refcoco_m(folder, tmp_path):
    """A local copy of Voxel51/RefCOCO-M as its Hub repository holds it: fiftyone.yml + an export."""
    media = tmp_path / "refcoco_m_media"
    media.mkdir()
    hub = fo.Dataset()
    masks = []
    for image_id, refs in ((9, [(0, "left guy", "person"), (0, "man on left", "person"), (1, "dog", "dog")]),
                           (30, [(4, "bottle", "bottle")])):
        width, height = IMAGES[image_id]
        path = str(media / coco_file(image_id))
        Image.new("RGB", (width, height), (120, 120, 120)).save(path)
        dets = []
        for ref_id, text, category in refs:
            mask = np.zeros((12, 10), dtype=bool)
            mask[2:9, 1 + ref_id:7] = True
            masks.append(mask)
            dets.append(fo.Detection(label=text, bounding_box=[0.1 * (ref_id + 1), 0.2, 0.3, 0.5], mask=mask,
                                     confidence=1.0, category=category, supercategory="thing", ref_id=ref_id))
        hub.add_sample(fo.Sample(filepath=path, image_id=image_id, file_name=coco_file(image_id),
                                 detections=fo.Detections(detections=dets)))
    hub.export(export_dir=str(folder), dataset_type=fo.types.FiftyOneDataset, export_media=True)
    (folder / "fiftyone.yml").write_text("name: RefCOCO-M\nformat: FiftyOneDataset\ntags:\n- refcoco\n")
    hub.delete()
    return str(folder), masks


def test_refcoco_m_in_the_project_schema_with_its_masks(tmp_path, dataset_name):
    folder, masks = write_refcoco_m(tmp_path / "RefCOCO-M", tmp_path)
    dataset = import_refcoco("refcoco-m", source=folder, dataset_name=dataset_name, chunk_size=3)
    assert len(dataset) == 4 and dataset.count_sample_tags() == {"val": 4}
    assert sorted(dataset.values("expression")) == ["bottle", "dog", "left guy", "man on left"]
    sample = dataset.match(fo.ViewField("expression") == "dog").first()
    (det,) = sample.ground_truth.detections
    assert det.label == "referent" and det.expression == "dog"
    assert det.bounding_box == pytest.approx([0.2, 0.2, 0.3, 0.5])
    assert np.array_equal(det.mask, masks[2])
    assert (sample.image_id, sample.ref_id, sample.category, sample.split) == (9, 1, "dog", "val")
    assert (sample.metadata.width, sample.metadata.height) == IMAGES[9]
    assert os.path.isfile(sample.filepath) and sample.filepath.startswith(folder)
    record = dataset.info["refcoco"]
    assert (record["hub_id"], record["revision"], record["splits"]) == ("Voxel51/RefCOCO-M", "main", ["val"])
    again = import_refcoco("refcoco-m", source=folder, dataset_name=dataset_name)
    assert len(again) == 4 and again.info["refcoco"]["last_import"]["already_present"] == 4
    assert not [n for n in fo.list_datasets() if n.startswith("refcoco-m-source-")]

    # The project's training and evaluation read it like any other grounding dataset.
    assert len(read_records(dataset)) == 4
    for s in dataset:
        s["predictions"] = s.ground_truth
        s.save()
    result = evaluate_grounding(dataset, "predictions", print_table=False)
    assert result["overall"]["count"] == 4 and result["overall"]["acc50"] == 1.0


def test_refcoco_m_of_another_schema_or_unreachable_says_what_to_do(tmp_path, dataset_name):
    with pytest.raises(DownloadError, match=r"Voxel51/RefCOCO-M.*revision 'main'.*pass source=FOLDER"):
        import_refcoco("refcoco-m", dataset_name=dataset_name)
    folder = tmp_path / "other"
    other = fo.Dataset()
    path = str(tmp_path / "x.jpg")
    Image.new("RGB", (8, 8)).save(path)
    other.add_sample(fo.Sample(filepath=path, ground_truth=fo.Classification(label="x")))
    other.export(export_dir=str(folder), dataset_type=fo.types.FiftyOneDataset)
    other.delete()
    with pytest.raises(SourceError, match=r"no Detections field 'detections'.*revision 'main'.*--revision"):
        import_refcoco("refcoco-m", source=folder, dataset_name=dataset_name)


# ---------------------------------------------------------------- refcocox


def test_refcocox_trains_only_on_images_no_eval_split_holds(tmp_path, images, dataset_name, capsys):
    root = tmp_path / "data"
    # RefCOCO and RefCOCO+ as in test_refcoco (RefCOCO+ from a save_to_disk copy); RefCOCOg puts
    # two train refs on image 42, which is in RefCOCO's testA, and one on image 9 (train everywhere).
    write_refer(root / "refcoco")
    save(make_source(), root / "refcoco+")
    umd = {"train": "train", "validation": "val", "test": "test"}
    g_refs = [("train", 20, 120, 42, 1, [1.0, 2.0, 50.0, 63.0], [100, 101]),
              ("train", 21, 121, 42, 18, [51.0, 2.0, 90.0, 63.0], [102]),
              ("train", 22, 122, 9, 1, [4.0, 6.0, 30.0, 40.0], [103]),
              ("validation", 23, 123, 49, 67, [3.0, 3.0, 37.0, 30.0], [104]),
              ("test", 24, 124, 30, 44, [5.0, 5.0, 20.0, 65.0], [105])]
    write_refer(root / "refcocog", g_refs, umd, "refs(umd).p")

    dataset = import_refcoco("refcocox", source=root, images_dir=images, dataset_name=dataset_name)
    out = capsys.readouterr().out
    assert "refcocox: removed 1 training images (3 expressions, 2 refs)" in out
    assert dataset.info["refcoco"]["removed"] == {"images": 1, "refs": 2, "expressions": 3}
    train = dataset.match_tags("train")
    assert 42 not in train.distinct("image_id")
    assert set(dataset.match(fo.ViewField("image_id") == 42).distinct("split")) == {"refcoco/testA", "refcoco+/testA"}
    assert dataset.count_values("split") == {"train": 8 + 8 + 1, "refcoco/val": 3, "refcoco/testA": 2,
                                             "refcoco/testB": 1, "refcoco+/val": 3, "refcoco+/testA": 2,
                                             "refcoco+/testB": 1, "refcocog/val": 1, "refcocog/test": 1}
    assert set(zip(*dataset.values(["source", "sent_id"]))) >= {("refcoco", 0), ("refcoco+", 0), ("refcocog", 103)}
    assert dataset.info["refcoco"]["splits"][:2] == ["train", "refcoco/val"]
    again = import_refcoco("refcocox", source=root, images_dir=images, dataset_name=dataset_name)
    assert again.info["refcoco"]["last_import"]["added"] == 0 and len(again) == len(dataset)

    # The recipe in training/ trains on it (here with the tiny preset, one epoch on the CPU).
    recipe = TrainConfig.from_json(REPO / "training" / "refcocox_grounder.json")
    result = fit(dataset, recipe.merged(preset="tiny", epochs=1, batch_size=8, num_workers=0,
                                        out_dir=str(tmp_path / "run")), cpu=True, progress=False)
    assert (result.best_dir / "model.safetensors").is_file() and result.best_val_iou is not None
    assert not result.skipped

    os.rename(root / "refcocog" / "refs(umd).p", root / "refcocog" / "refs(google).p")
    with pytest.raises(SourceError, match="Google partition"):
        import_refcoco("refcocox", source=root, images_dir=images, dataset_name=dataset_name)


def test_the_cli_offers_every_source(tmp_path, images, dataset_name, cli):
    code, out, _ = cli("import-refcoco", "--help")
    assert code == 0 and all(name in out for name in ("grefcoco", "refcoco-m", "refcocox", "--revision"))
    folder = write_grefcoco(tmp_path / "grefcoco")
    code, out, err = cli("import-refcoco", "grefcoco", "--source", folder, "--images-dir", images,
                         "--dataset-name", dataset_name, "--no-progress")
    assert code == 0, err
    assert "6 expressions (train 3, val 2, testA 1)" in out
    assert "2 expressions refer to one object, 2 to several, 2 to none" in out
    code, _, err = cli("import-refcoco", "refcocox", "--revision", "main")
    assert code == 2 and err.startswith("error: --revision names one Hub revision")
