"""``GroundingModel`` with FiftyOne's ``apply_model``, and this repository as a remote model-zoo source."""

import shutil
import socket
import tarfile
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import fiftyone as fo
import fiftyone.zoo as foz
from huggingface_hub import constants

from fiftyone_grounding import hub
from fiftyone_grounding.models.calibration import CALIBRATION_NAME
from fiftyone_grounding.models.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from fiftyone_grounding.devices import default_apply_batch_size
from fiftyone_grounding.data.images import load_rgb, normalize_pixels_batch, preprocess_image, resize_rgb, rgb_tensor
from fiftyone_grounding.data.labels import expression_text
from fiftyone_grounding.inference.apply import apply_grounding_model, ground_phrase
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.app.zoo import DEMO_CHECKPOINT_ENV, MODELS, DownloadError, register_local_source
from hub_cache import cache_repo, checkpoint_files, use_cache

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO = "fiftyone-grounding/tiny-synthetic-demo"
SEED = "fiftyone-grounding/seed-refcoco"


@pytest.fixture
def dataset(synthetic_dataset, dataset_name):
    """A writable copy of the session's synthetic dataset (80 expressions, 2 per image)."""
    return synthetic_dataset.clone(dataset_name)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")


def test_uint8_pixels_normalized_on_the_device_give_the_model_input_of_training(synthetic_dataset, model):
    """Inference moves resized uint8 images and normalizes them where the model runs: the
    same numbers as training's preprocessing, so the same boxes."""
    cfg = model.config
    paths, phrases = synthetic_dataset.limit(6).values(["filepath", "expression"])
    images = [load_rgb(p) for p in paths]
    reference = torch.stack([preprocess_image(im, cfg.image_size, cfg.image_mean, cfg.image_std) for im in images])
    uint8 = torch.stack([rgb_tensor(resize_rgb(im, cfg.image_size)) for im in images])
    assert uint8.dtype == torch.uint8 and uint8.shape == (6, cfg.image_size, cfg.image_size, 3)
    assert torch.equal(normalize_pixels_batch(uint8, cfg.image_mean, cfg.image_std), reference)
    a, b = model.predict_boxes(uint8, phrases).result(), model.predict_boxes(reference, phrases).result()
    assert torch.equal(a.boxes, b.boxes) and np.array_equal(a.confidences, b.confidences)


def test_32_samples_take_one_forward_pass(dataset, model, count_forwards):
    view = dataset.limit(32)
    forwards = count_forwards(model)
    view.apply_model(model, label_field="pred", prompt_field="expression", batch_size=32)
    assert forwards.calls == 1
    assert view.count("pred.detections") == 32


def test_predictions_are_one_relative_box_labelled_like_the_ground_truth(dataset, model):
    view = dataset.limit(32)
    view.apply_model(model, label_field="pred", prompt_field="expression", batch_size=16, num_workers=0)
    for sample in view.select_fields(["expression", "ground_truth", "pred"]):
        assert isinstance(sample.pred, fo.Detections)
        assert len(sample.pred.detections) == 1
        det = sample.pred.detections[0]
        x, y, w, h = det.bounding_box
        assert 0 <= x <= 1 and 0 <= y <= 1 and w >= 0 and h >= 0
        assert x + w <= 1 + 1e-6 and y + h <= 1 + 1e-6
        assert isinstance(det.confidence, float) and 0 <= det.confidence <= 1
        assert det.label == sample.ground_truth.detections[0].label == "referent"
        assert det.expression == sample.ground_truth.detections[0].expression == expression_text(sample.expression)


def _boxes_by_image_and_phrase(view, field):
    paths, phrases, boxes = view.values(["filepath", "expression", f"{field}.detections.bounding_box"])
    return {(p, e): np.asarray(b[0]) for p, e, b in zip(paths, phrases, boxes)}


def test_boxes_follow_their_phrase_when_phrases_are_permuted(dataset, model):
    view = dataset.limit(40)  # whole images: the expressions of an image are consecutive
    view.apply_model(model, label_field="pred_a", prompt_field="expression", batch_size=32, num_workers=0)
    before = _boxes_by_image_and_phrase(view, "pred_a")

    # Rotate the phrases among the samples of each image: every phrase moves to another sample.
    paths, phrases = view.values(["filepath", "expression"])
    by_image = defaultdict(list)
    for i, path in enumerate(paths):
        by_image[path].append(i)
    moved = list(phrases)
    for indices in by_image.values():
        for i, j in zip(indices, indices[1:] + indices[:1]):
            moved[j] = phrases[i]
    assert sum(a != b for a, b in zip(moved, phrases)) >= len(phrases) // 2
    view.set_values("expression", moved)
    # A different batch size also changes which phrases share a batch (and the padding).
    view.apply_model(model, label_field="pred_b", prompt_field="expression", batch_size=7, num_workers=0)
    after = _boxes_by_image_and_phrase(view, "pred_b")

    assert after.keys() == before.keys()
    for key, box in after.items():
        np.testing.assert_allclose(box, before[key], atol=1e-4, err_msg=str(key))
    assert view.values("pred_b.detections.expression") == [[expression_text(p)] for p in moved]
    # The property is not vacuous: the two phrases of an image do get different boxes.
    assert any(not np.allclose(before[(p, phrases[i])], before[(p, phrases[j])], atol=1e-4)
               for p, (i, j, *_) in by_image.items() if phrases[i] != phrases[j])


def test_missing_or_empty_phrase_gets_no_prediction_and_no_other_phrase(dataset, model):
    ids = dataset.values("id")
    blank = {ids[3]: None, ids[4]: "", ids[5]: "   ", ids[40]: None}
    for sample_id, value in blank.items():
        sample = dataset[sample_id]
        sample["expression"] = value
        sample.save()
    dataset.apply_model(model, label_field="pred", prompt_field="expression", batch_size=32, num_workers=0)
    for sample_id, phrase, labels in zip(*dataset.values(["id", "expression", "pred.detections.expression"])):
        if sample_id in blank:
            assert labels is None, sample_id
        else:
            assert labels == [expression_text(phrase)]


def test_batched_boxes_equal_one_by_one_predict(dataset, model):
    view = dataset.limit(6)
    view.apply_model(model, label_field="pred", prompt_field="expression", batch_size=6, num_workers=0)
    for path, phrase, boxes in zip(*view.values(["filepath", "expression", "pred.detections.bounding_box"])):
        single = model.predict(load_rgb(path), phrase)
        np.testing.assert_allclose(single.detections[0].bounding_box, boxes[0], atol=1e-4)


def test_fast_apply_equals_fiftyone_apply_model_on_a_shuffled_view(dataset, model, count_forwards):
    """``apply_grounding_model`` (bulk read, images grouped wherever their samples are, bulk
    writes by id) writes what FiftyOne's ``apply_model`` writes, sample by sample."""
    view = dataset.shuffle(seed=3)  # the expressions of an image are no longer consecutive
    ids = dataset.values("id")
    blank = {ids[5]: "  ", ids[17]: None}
    dataset.set_values("expression", blank, key_field="id")
    view.apply_model(model, label_field="reference", prompt_field="expression", batch_size=16, num_workers=0)
    forwards, fractions = count_forwards(model), []
    run = apply_grounding_model(view, model, label_field="fast", batch_size=16,
                                progress_callback=lambda f, label: fractions.append(f))
    # 78 phrases on 40 images, packed image by image into batches of <= 16 phrases.
    assert forwards.calls <= 6
    assert run["processed"] == 80 and sorted(run["skipped"]) == sorted((i, "missing or empty phrase") for i in blank)
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)
    for sid, ref, fast, ref_label, fast_label, ref_conf, fast_conf in zip(*dataset.values(
            ["id", "reference.detections.bounding_box", "fast.detections.bounding_box",
             "reference.detections.label", "fast.detections.label",
             "reference.detections.confidence", "fast.detections.confidence"])):
        if sid in blank:
            assert ref is None and fast is None
        else:
            np.testing.assert_allclose(fast[0], ref[0], atol=1e-5)
            np.testing.assert_allclose(fast_conf, ref_conf, atol=1e-5)
            assert fast_label == ref_label and 0 < fast_conf[0] < 1
    assert dataset.get_field("fast").document_type is fo.Detections
    assert len(set(dataset.values("fast.detections.confidence", unwind=True))) > 1  # a real confidence, not 1.0


def test_fast_apply_batch_size_follows_the_device(dataset, model, count_forwards):
    """No batch size given: the default batch size of the model's device (here the CPU)."""
    batch = default_apply_batch_size("cpu")
    forwards = count_forwards(model)
    run = apply_grounding_model(dataset, model, label_field="pred")  # CPU: 80 phrases, 2 per image
    assert run["processed"] == 80 and forwards.calls == -(-80 // batch)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        apply_grounding_model(dataset, model, label_field="pred", batch_size=0)


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_fast_apply_with_workers_and_a_small_write_chunk(dataset, model, worker_type):
    """Decoding threads or DataLoader processes and several bulk writes give the same boxes."""
    view = dataset.limit(30)
    apply_grounding_model(view, model, label_field="a", batch_size=8, num_workers=0)
    apply_grounding_model(view, model, label_field="b", batch_size=5, num_workers=2, worker_type=worker_type,
                          write_every=7, overlap=True)  # one batch in flight, as on a GPU
    apply_grounding_model(view.limit(3), model, label_field="c", batch_size=64, num_workers=4,
                          worker_type=worker_type)  # 1 batch
    a, b, c = view.values(["a.detections.bounding_box", "b.detections.bounding_box", "c.detections.bounding_box"])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c[:3]), np.asarray(a[:3]), atol=1e-5)
    assert c[3:] == [None] * 27
    with pytest.raises(ValueError, match="no field 'caption'"):
        apply_grounding_model(view, model, label_field="d", prompt_field="caption")
    with pytest.raises(ValueError, match="worker_type must be one of thread, process, got 'fork'"):
        apply_grounding_model(view, model, label_field="d", worker_type="fork")


def test_decoding_threads_stop_when_a_run_is_interrupted(dataset, model):
    """Ctrl-C in the middle: the batches done are written (also the chunks handed to the
    background writer), and no decoding or writing thread is left running (the queued
    images are dropped)."""
    view = dataset.limit(40)
    apply_grounding_model(view, model, label_field="reference", batch_size=4)
    calls = []

    def interrupted_at_batch_3(fraction, message):
        calls.append(message)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as interrupted:
        apply_grounding_model(view, model, label_field="pred", batch_size=4, num_workers=3,
                              progress_callback=interrupted_at_batch_3, overlap=True, write_every=3)
    # stopped by the run itself, not when the traceback (kept here, as a notebook keeps it) goes
    assert interrupted.traceback and not [t for t in threading.enumerate()
                                          if t.name.startswith(("fiftyone-grounding-decode",
                                                                "fiftyone-grounding-write"))]
    written, reference = view.values(["pred.detections.bounding_box", "reference.detections.bounding_box"])
    assert written[:12] == reference[:12] and written[12:] == [None] * 28


def test_a_failed_background_write_is_raised_not_lost(dataset, model):
    """The labels are written in a background thread: when a write fails (here the dataset
    is deleted in the middle of the run), the run raises that error instead of going on
    as if its predictions were saved."""
    name, batches = dataset.name, []

    def delete_the_dataset_at_batch_2(fraction, message):
        batches.append(message)
        if len(batches) == 2:
            fo.delete_dataset(name)

    with pytest.raises(ValueError, match="deleted"):
        apply_grounding_model(dataset, model, label_field="pred", batch_size=4, write_every=4,
                              progress_callback=delete_the_dataset_at_batch_2)
    assert 2 <= len(batches) < 20  # stopped at the first write after the deletion, not at the end
    assert not [t for t in threading.enumerate() if t.name.startswith("fiftyone-grounding-write")]


def test_a_field_of_another_label_type_is_refused_before_anything_is_written(dataset, model):
    """Bulk writes skip FiftyOne's validation: a Detections written into, say, a
    Classification field would leave samples that no longer load. Refused up front."""
    dataset.set_values("pred", [fo.Classification(label="cat")] * len(dataset))
    for run in (lambda: apply_grounding_model(dataset, model, label_field="pred"),
                lambda: ground_phrase(dataset, "the red circle", model, label_field="pred")):
        with pytest.raises(ValueError, match=r"'pred' already holds Classification, not Detections: choose another"):
            run()
    assert dataset.distinct("pred.label") == ["cat"] and isinstance(dataset.first().pred, fo.Classification)
    assert apply_grounding_model(dataset.limit(4), model, label_field="pred2")["processed"] == 4
    assert apply_grounding_model(dataset.limit(4), model, label_field="pred2")["processed"] == 4  # its own: fine


# -- the remote model-zoo source -------------------------------------------------------------


@pytest.fixture
def zoo_dir(tmp_path, monkeypatch):
    """An empty FiftyOne model-zoo folder for this test."""
    path = tmp_path / "zoo"
    monkeypatch.setattr(fo.config, "model_zoo_dir", str(path))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_source_loads_the_demo_checkpoint(zoo_dir, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(DEMO_CHECKPOINT_ENV, str(tiny_checkpoint))
    url = register_local_source(str(REPO_ROOT))
    assert url in foz.list_zoo_model_sources()
    assert DEMO in foz.list_zoo_models(source=url)

    model = foz.load_zoo_model(DEMO, cache=False)
    assert isinstance(model, GroundingModel)
    copied = zoo_dir / "fiftyone-grounding" / "tiny-synthetic-demo"
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (copied / name).read_bytes() == (tiny_checkpoint / name).read_bytes()

    # FiftyOne sees the copy as downloaded: loading again does not copy again, deleting removes it.
    assert foz.is_zoo_model_downloaded(DEMO)
    monkeypatch.setenv(DEMO_CHECKPOINT_ENV, str(zoo_dir / "gone"))
    assert isinstance(foz.load_zoo_model(DEMO, cache=False), GroundingModel)
    foz.delete_zoo_model(DEMO)
    assert not copied.exists() and not foz.is_zoo_model_downloaded(DEMO)


def test_github_style_archive_source_and_hub_checkpoint(zoo_dir, tiny_checkpoint, http_root, monkeypatch,
                                                         tmp_path):
    """The source from an archive URL; the seed model's checkpoint from its Hub repository at the
    pinned revision, read from the Hugging Face cache (offline) into FiftyOne's zoo folder, where
    it stays loadable when that cache is gone."""
    root, base = http_root
    # The repository as an archive with one top folder, like GitHub's, for foz.register_zoo_model_source.
    with tarfile.open(root / "fiftyone-grounding.tar.gz", "w:gz") as tar:
        for name in ("manifest.json", "__init__.py", "fiftyone_grounding"):
            tar.add(REPO_ROOT / name, arcname=f"fiftyone-grounding-main/{name}",
                    filter=lambda info: None if "__pycache__" in info.name else info)
    # The seed's repository in the Hugging Face cache (a tiny checkpoint stands in for its weights);
    # its main branch holds something else: the zoo reads the pinned revision.
    entry = MODELS[SEED]
    assert entry.repo_id == SEED and entry.revision
    cache = use_cache(monkeypatch, tmp_path / "hf-cache")
    cache_repo(cache, entry.repo_id, checkpoint_files(tiny_checkpoint), revision=entry.revision)
    cache_repo(cache, entry.repo_id, {CONFIG_NAME: b"{}"})

    foz.register_zoo_model_source(f"{base}/fiftyone-grounding.tar.gz")
    assert {SEED, DEMO, "fiftyone-grounding/grounder-refcoco"} <= set(foz.list_zoo_models())
    model = foz.load_zoo_model(SEED, cache=False)
    assert isinstance(model, GroundingModel) and model.source == SEED
    assert foz.is_zoo_model_downloaded(SEED)
    copied = zoo_dir / "fiftyone-grounding" / "seed-refcoco"
    assert {p.name for p in copied.iterdir()} == {CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME}
    for name in (CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME):
        assert (copied / name).read_bytes() == (tiny_checkpoint / name).read_bytes() and not (copied / name).is_symlink()
    shutil.rmtree(cache)
    assert isinstance(foz.load_zoo_model(SEED, cache=False), GroundingModel)


def _one_sentence(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")
    assert message.count(". ") == 0, message
    return message


def test_download_fails_with_one_clear_sentence(zoo_dir, tmp_path, monkeypatch):
    register_local_source(str(REPO_ROOT))
    target = zoo_dir / "fiftyone-grounding" / "seed-refcoco"  # the checkpoint folder
    use_cache(monkeypatch, tmp_path / "hf-cache")  # empty
    revision = MODELS[SEED].revision

    with pytest.raises(DownloadError) as error:
        foz.load_zoo_model(SEED, cache=False)
    assert _one_sentence(error).startswith(
        f"{SEED} (revision {revision!r}) is not in the local Hugging Face cache and the Hub cannot be used "
        "(HF_HUB_OFFLINE is set): unset HF_HUB_OFFLINE to download it")

    # not declared offline, but the endpoint does not answer: said at once, not after retries
    port = _free_port()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(hub, "_probes", {})
    with pytest.raises(DownloadError) as error:
        foz.load_zoo_model(SEED, cache=False)
    assert f"the Hub cannot be used (cannot connect to 127.0.0.1:{port}: " in _one_sentence(error)
    assert not target.exists()

    monkeypatch.setenv(DEMO_CHECKPOINT_ENV, str(tmp_path / "no-checkpoint"))
    with pytest.raises(DownloadError) as error:
        foz.load_zoo_model(DEMO, cache=False)
    assert "fiftyone-grounding demo" in str(error.value) and DEMO_CHECKPOINT_ENV in str(error.value)


def test_a_confidence_threshold_keeps_the_same_boxes_on_every_path(dataset, model):
    """FiftyOne's apply_model(confidence_thresh=...), the fast path and a model made with a
    threshold keep the same boxes; the others become empty Detections."""
    view = dataset.limit(30)
    apply_grounding_model(view, model, label_field="all")
    confidences = [c[0] for c in view.values("all.detections.confidence")]
    threshold = float(np.median(confidences))
    view.apply_model(model, label_field="fo", prompt_field="expression", confidence_thresh=threshold)
    apply_grounding_model(view, model, label_field="fast", confidence_thresh=threshold)
    strict = GroundingModel(model.model, device="cpu", confidence_thresh=threshold)
    apply_grounding_model(view, strict, label_field="own")
    kept = [[c] if c >= threshold else [] for c in confidences]
    for field in ("fo", "fast", "own"):
        got = view.values(f"{field}.detections.confidence")
        assert [len(c) for c in got] == [len(c) for c in kept], field
        assert sum(got, []) == pytest.approx(sum(kept, []), abs=1e-5), field
    assert 0 < view.count("fast.detections") < len(view)
    assert ground_phrase(view, "the red circle", model, confidence_thresh=2.0) == 0
    assert view.count("grounded.detections") == 0 and len(view.exists("grounded")) == len(view)


# -- the phrase source at load time, and FiftyOne's "Apply zoo model" operator ---------------------


def test_a_phrase_field_given_at_load_time_needs_no_apply_model_argument(dataset, tiny_checkpoint):
    """``from_checkpoint(RUN_DIR, prompt_field=...)``: the run folder means its best/, and
    ``apply_model`` with no other argument writes what ``apply_model(prompt_field=...)`` writes;
    a sample without a phrase still gets no box."""
    ids = dataset.values("id")
    dataset.set_values("expression", {ids[2]: None, ids[9]: "  "}, key_field="id")
    view = dataset.limit(24)
    plain = GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")
    view.apply_model(plain, label_field="per_call", prompt_field="expression", batch_size=8)
    loaded = GroundingModel.from_checkpoint(tiny_checkpoint.parent, device="cpu", prompt_field="expression")
    assert loaded.source == str(tiny_checkpoint)  # the run folder's best/
    view.apply_model(loaded, label_field="at_load", batch_size=8)
    per_call, at_load = view.values(["per_call.detections.bounding_box", "at_load.detections.bounding_box"])
    assert at_load[2] is None and at_load[9] is None and sum(b is not None for b in at_load) == 22
    for a, b in zip(per_call, at_load):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_one_prompt_for_every_sample_and_the_per_call_field_wins(dataset, model):
    view = dataset.limit(10)
    view.set_values("expression", [None] + view.values("expression")[1:])
    everywhere = model.with_options(prompt="  the large blue square ")
    assert everywhere.model is model.model  # nothing loaded again
    view.apply_model(everywhere, label_field="prompted", batch_size=4)
    assert view.values("prompted.detections.expression") == [["the large blue square"]] * 10  # the phrase-less one too
    view.apply_model(everywhere, label_field="own", prompt_field="expression", batch_size=4)
    own = view.values("own.detections.expression")
    assert own[0] is None and own[1:] == [[expression_text(e)] for e in view.values("expression")[1:]]
    single = everywhere.predict(load_rgb(view.first().filepath))  # predict() uses it too
    assert single.detections[0].expression == "the large blue square"
    with pytest.raises(ValueError, match="has no phrases to find: pass apply_model"):
        view.apply_model(model, label_field="none", batch_size=4)
    with pytest.raises(ValueError, match="not both"):
        model.with_options(prompt="a", prompt_field="expression")
    with pytest.raises(ValueError, match="The prompt is empty"):
        GroundingModel(model.model, device="cpu", prompt="   ")


def test_the_zoo_loads_a_model_with_its_phrase_source(zoo_dir, dataset, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(DEMO_CHECKPOINT_ENV, str(tiny_checkpoint))
    register_local_source(str(REPO_ROOT))
    view = dataset.limit(6)
    view.apply_model(foz.load_zoo_model(DEMO, prompt_field="expression", cache=False), label_field="field")
    assert view.values("field.detections.expression") == [[expression_text(e)] for e in view.values("expression")]
    model = foz.load_zoo_model(DEMO, prompt="the red circle", confidence_thresh=0.0, cache=False)
    assert model.source == DEMO and model.labels.confidence_thresh == 0.0
    view.apply_model(model, label_field="phrase")
    assert view.values("phrase.detections.expression") == [["the red circle"]] * 6


def _zoo_operator_ctx(dataset, remote_params):
    from fiftyone.operators.executor import ExecutionContext

    return ExecutionContext(request_params={"dataset_name": dataset.name, "params": {
        "model": DEMO, "label_field": "zoo", "remote_params": remote_params}})


def _apply_like_the_zoo_operator(ctx, view):
    """What ``@voxel51/zoo/apply_zoo_model`` does in execute() for a remote model (fiftyone-plugins
    ``plugins/zoo/__init__.py``): its ``remote_params`` through the source's ``parse_parameters``,
    ``load_zoo_model(model, **kwargs)``, then ``apply_model`` without a prompt field."""
    zoo_model = foz.get_zoo_model(ctx.params["model"])
    assert isinstance(zoo_model, foz.RemoteZooModel)
    kwargs = ctx.params.get("remote_params", {})
    zoo_model.parse_parameters(ctx, kwargs)
    model = foz.load_zoo_model(ctx.params["model"], **kwargs)
    view.apply_model(model, label_field=ctx.params["label_field"], confidence_thresh=ctx.params.get("confidence_thresh"),
                     store_logits=False,
                     batch_size=None, num_workers=0, skip_failures=True, output_dir=None, rel_dir=None)


def test_the_zoo_operators_form_and_parameters_apply_per_sample_or_typed_phrases(zoo_dir, dataset, tiny_checkpoint,
                                                                                  monkeypatch):
    """The zoo source's resolve_input / parse_parameters, called as FiftyOne's Apply zoo model
    operator calls them (through ``RemoteZooModel``): the form offers the dataset's text fields
    (and flags a wrong one), and the model it loads grounds each sample's phrase, or one phrase."""
    monkeypatch.setenv(DEMO_CHECKPOINT_ENV, str(tiny_checkpoint))
    register_local_source(str(REPO_ROOT))
    zoo_model = foz.get_zoo_model(DEMO)

    form = zoo_model.resolve_input(_zoo_operator_ctx(dataset, {}))
    fields = form.type.properties
    # the zoo form has a confidence threshold of its own, which it passes to apply_model: not a second one
    assert set(fields) >= {"phrase_source", "prompt_field"} and "confidence_thresh" not in fields
    text_fields = sorted(n for n, f in dataset.get_field_schema().items() if isinstance(f, fo.StringField))
    assert [c.value for c in fields["prompt_field"].view.choices] == text_fields and "expression" in text_fields
    assert fields["prompt_field"].default == "expression" and not fields["prompt_field"].invalid
    wrong = zoo_model.resolve_input(_zoo_operator_ctx(dataset, {"prompt_field": "ground_truth"})).type.properties
    assert wrong["prompt_field"].invalid and "not a text field" in wrong["prompt_field"].error_message
    typed = zoo_model.resolve_input(_zoo_operator_ctx(dataset, {"phrase_source": "phrase", "prompt": " "}))
    assert typed.type.properties["prompt"].invalid and "prompt_field" not in typed.type.properties

    view = dataset.limit(8)
    _apply_like_the_zoo_operator(_zoo_operator_ctx(view, {}), view)  # the form's defaults
    assert view.values("zoo.detections.expression") == [[expression_text(e)] for e in view.values("expression")]
    ctx = _zoo_operator_ctx(view, {"phrase_source": "phrase", "prompt": " the green triangle"})
    ctx.params["label_field"] = "zoo_typed"
    _apply_like_the_zoo_operator(ctx, view)
    assert view.values("zoo_typed.detections.expression") == [["the green triangle"]] * 8
    ctx.params.update(label_field="zoo_sure", confidence_thresh=2.0)  # the zoo form's own threshold
    _apply_like_the_zoo_operator(ctx, view)
    assert view.count("zoo_sure.detections") == 0 and view.count("zoo_typed.detections") == 8
    with pytest.raises(ValueError, match="The phrase is empty"):
        _apply_like_the_zoo_operator(_zoo_operator_ctx(view, {"phrase_source": "phrase", "prompt": ""}), view)
