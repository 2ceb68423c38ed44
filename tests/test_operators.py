"""The plugin's operators, run through FiftyOne's own executor (``foo.execute_operator``)."""

import shutil
from pathlib import Path

import pytest
import yaml

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F
from fiftyone.operators.delegated import DelegatedOperationService
from fiftyone.operators.executor import ExecutionContext, ExecutionError, ExecutionRunState, Executor
from fiftyone.operators.registry import OperatorRegistry
from fiftyone.plugins.context import build_plugin_contexts

from fiftyone_grounding.app.install import PLUGIN_DIR
from fiftyone_grounding.data.labels import expression_text, make_detections
from fiftyone_grounding.app.streaming import shown_results
from fiftyone_grounding.app.zoo import DEMO_CHECKPOINT_ENV, register_local_source

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "@fiftyone-grounding/grounding"


def uri(name: str) -> str:
    return f"{PLUGIN}/{name}"


def execute(name: str, **ctx):
    """Run an operator immediately through FiftyOne's executor: ``(results, App messages)``, the
    results as the App shows them (a streaming operator returns them in its ``show_output``)."""
    execution = foo.execute_operator(uri(name), ctx=ctx)
    requests = execution.executor.to_json()["requests"]
    return shown_results(execution), requests


def request_names(requests) -> list[str]:
    return [r["operator_uri"] for r in requests]


@pytest.fixture(autouse=True)
def plugin(grounding_plugin_dir):
    return grounding_plugin_dir


@pytest.fixture
def dataset(synthetic_dataset, dataset_name):
    """A writable copy of the session's synthetic dataset (80 expressions)."""
    return synthetic_dataset.clone(dataset_name)


def test_plugin_registers_the_operators_and_panels_that_fiftyone_yml_lists():
    manifest = yaml.safe_load((PLUGIN_DIR / "fiftyone.yml").read_text())
    contexts = [c for c in build_plugin_contexts() if c.name == PLUGIN]
    assert len(contexts) == 1 and not contexts[0].errors, contexts[0].errors if contexts else "plugin not found"
    registered = {op.name: op for op in OperatorRegistry().list_operators() if op.plugin_name == PLUGIN}
    assert set(registered) == set(manifest["operators"]) | set(manifest["panels"])
    assert {name for name, op in registered.items() if isinstance(op, foo.Panel)} == set(manifest["panels"])
    assert manifest["author"] and "grounding" in manifest["tags"]


# MEDIUM where fields are written, HIGH where datasets or files are created, LOW for the rest
RISK = {"import_grounding_dataset": "HIGH", "train_grounding_model": "HIGH", "apply_grounding_model": "MEDIUM",
        "evaluate_grounding_model": "MEDIUM", "ground_phrase": "MEDIUM", "search_phrase": "MEDIUM",
        "release_grounding_models": "LOW"}


def test_operators_are_configured_like_fiftyones_own():
    """Icons that exist in the plugin folder, a declared risk level, the App's Execute / Schedule
    choice (training scheduled by default) and progress streamed from immediate runs."""
    registered = {op.name: op for op in OperatorRegistry().list_operators() if op.plugin_name == PLUGIN}
    for name, risk in RISK.items():
        config = registered[name].config
        assert config.risk_level == types.RiskLevel[risk], name
        for icon in (config.light_icon, config.dark_icon):
            assert (PLUGIN_DIR / icon.lstrip("/")).is_file(), (name, icon)
        assert config.light_icon != config.dark_icon
        assert config.allow_immediate_execution and config.allow_delegated_execution, name
        assert config.default_choice_to_delegated == (name == "train_grounding_model"), name
        assert config.execute_as_generator, name
    panel = registered["grounding_panel"].config
    assert panel.surfaces == "modal" and panel.light_icon and panel.dark_icon
    metrics = [op for op in registered.values() if isinstance(op, foo.EvaluationMetric)]
    assert metrics and all(op.config.risk_level == types.RiskLevel.LOW for op in metrics)


def test_requirements_txt_lists_what_the_package_needs():
    """``fiftyone plugins requirements --install`` reads requirements.txt: the package's own
    dependencies without FiftyOne."""
    import tomllib

    from fiftyone.core.utils import load_requirements

    listed = load_requirements(str(PLUGIN_DIR / "requirements.txt"))
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(listed) == sorted(d for d in declared if not d.startswith("fiftyone"))


def test_import_synthetic_dataset(dataset_name, tmp_path):
    results, requests = execute("import_grounding_dataset", params={
        "source": "synthetic", "dataset_name": dataset_name, "num_images": 3, "images_dir": str(tmp_path)})
    assert results == {"dataset": dataset_name, "num_samples": 6}
    dataset = fo.load_dataset(dataset_name)
    assert dataset.persistent
    assert {"expression", "ground_truth", "split"} <= set(dataset.get_field_schema())
    assert [n for n in request_names(requests) if n != "set_progress"] == ["open_dataset", "show_output"]


def test_import_refcoco_form_checks_its_folders(tmp_path):
    with pytest.raises(ExecutionError, match="There is no folder") as error:
        foo.execute_operator(uri("import_grounding_dataset"), ctx={"params": {
            "source": "refcoco", "annotations_dir": str(tmp_path / "missing")}})
    assert "Traceback" not in str(error.value)


def test_the_import_form_offers_every_source_and_imports_grefcoco(tmp_path, dataset_name):
    from fiftyone_grounding.sources.base import NAMES
    from refcoco_files import draw_images, write_grefcoco

    ctx = ExecutionContext(request_params={"params": {"source": "refcoco", "variant": "grefcoco"}})
    form = OperatorRegistry().get_operator(uri("import_grounding_dataset")).resolve_input(ctx)
    variants = form.type.properties["variant"]
    assert [c.value for c in variants.view.choices] == list(NAMES) and "revision" in form.type.properties
    results, _ = execute("import_grounding_dataset", params={
        "source": "refcoco", "variant": "grefcoco", "dataset_name": dataset_name,
        "annotations_dir": write_grefcoco(tmp_path / "grefcoco"), "images_dir": draw_images(tmp_path / "img")})
    assert results == {"dataset": dataset_name, "num_samples": 6}


def test_a_scheduled_training_reports_progress_and_is_recorded_on_the_dataset(dataset, tmp_path):
    """Scheduled as the App's Schedule button does (``request_delegation``; the form has no
    checkbox of its own), run by FiftyOne's delegated service: progress on the run, the result
    stored, and the training recorded on the dataset with its config, view and checkpoint."""
    out_dir = tmp_path / "run"
    view = dataset.match(F("split") != "test")
    form = OperatorRegistry().get_operator(uri("train_grounding_model")).resolve_type(
        ExecutionContext(request_params={"dataset_name": dataset.name, "params": {}}), "inputs")
    assert "delegate" not in form.type.properties and "view_target" in form.type.properties
    result = foo.execute_operator(uri("train_grounding_model"), ctx={"view": view, "request_delegation": True,
                                                                     "params": {"preset": "tiny", "epochs": 1,
                                                                                "batch_size": 8,
                                                                                "out_dir": str(out_dir)}})
    assert result.delegated
    service = DelegatedOperationService()
    operation = service.get(result.result["id"])
    try:
        assert operation.run_state == ExecutionRunState.QUEUED
        service.execute_operation(operation)
        done = service.get(operation.id)
        assert done.run_state == ExecutionRunState.COMPLETED, done.result
        results = done.result.result
        assert results["checkpoint"] == str(out_dir / "best")
        assert 0 < done.status.progress <= 1 and done.status.label.startswith("epoch 1/1")
        assert (out_dir / "best" / "model.safetensors").is_file()
    finally:
        service.delete_operation(operation.id)
    info = dataset.get_run_info(results["run_key"])
    assert info.config.method == "fiftyone_grounding.train" and info.config.status == "completed"
    assert info.config.checkpoint == results["checkpoint"] and info.config.epochs_done == 1
    assert info.config.best_val_iou == pytest.approx(results["best_val_iou"])
    assert info.config.train_config["preset"] == "tiny" and info.config.train_config["out_dir"] == str(out_dir)
    assert dataset.load_run_view(results["run_key"]).values("id") == view.values("id")


def test_each_training_from_the_app_gets_a_new_folder_unless_one_is_named(dataset, tmp_path, monkeypatch):
    """A second training of the same preset must neither resume nor overwrite the first."""
    monkeypatch.setattr(fo.config, "default_dataset_dir", str(tmp_path))
    params = {"preset": "tiny", "epochs": 1, "batch_size": 16}
    first = execute("train_grounding_model", view=dataset.view(), params=params)[0]["checkpoint"]
    second = execute("train_grounding_model", view=dataset.view(), params=params)[0]["checkpoint"]
    assert first != second
    assert Path(first).parents[1] == Path(second).parents[1] == tmp_path / "grounding-runs"
    assert Path(first).parent.name.startswith(f"{dataset.name}-tiny-")
    named = execute("train_grounding_model", view=dataset.view(), params={**params, "out_dir": str(tmp_path / "mine")})
    assert named[0]["checkpoint"] == str(tmp_path / "mine" / "best")


def test_apply_to_a_view_or_the_selected_samples(dataset, tiny_checkpoint):
    from fiftyone_grounding.runs import checkpoint_of

    view = dataset.match(F("split") == "val")
    results, requests = execute("apply_grounding_model", view=view, params={
        "model": str(tiny_checkpoint), "label_field": "pred"})
    assert results == {"label_field": "pred", "num_predictions": len(view), "num_skipped": 0,
                       "checkpoint": str(tiny_checkpoint)}
    assert dataset.count("pred.detections") == len(view) < len(dataset)
    assert view.values("pred.detections.expression") == [[expression_text(e)] for e in view.values("expression")]
    assert view.distinct("pred.detections.label") == ["referent"]
    assert checkpoint_of(dataset, "pred") == str(tiny_checkpoint)
    assert dataset.load_run_view("labels_pred").values("id") == view.values("id")

    selected = dataset.values("id")[:3]
    execute("apply_grounding_model", dataset=dataset, selected=selected, params={
        "model": str(tiny_checkpoint), "label_field": "pred_selected", "view_target": "SELECTED_SAMPLES"})
    assert dataset.exists("pred_selected.detections").values("id") == selected


def test_an_immediate_run_streams_its_progress_and_a_scheduled_one_touches_no_app(dataset, tiny_checkpoint):
    """Immediate: set_progress messages as the batches finish (rising to 1), then the reload and
    the output. Delegated: no App messages, the results returned, progress to the run record."""
    results, requests = execute("apply_grounding_model", dataset=dataset, params={
        "model": str(tiny_checkpoint), "label_field": "pred", "batch_size": 16})
    names = request_names(requests)
    progress = [r["params"]["progress"] for r in requests if r["operator_uri"] == "set_progress"]
    assert names[-2:] == ["reload_dataset", "show_output"] and set(names[:-2]) == {"set_progress"}
    assert progress[0] == 0 and progress[-1] == 1.0 and progress == sorted(progress) and len(progress) >= 3
    assert results["num_predictions"] == len(dataset)

    reported = []
    ctx = ExecutionContext(request_params={"dataset_name": dataset.name, "delegated": True, "params": {
        "model": str(tiny_checkpoint), "label_field": "pred_delegated", "batch_size": 16}},
        executor=Executor(), set_progress=lambda op_id, progress: reported.append(progress.progress))
    delegated = OperatorRegistry().get_operator(uri("apply_grounding_model")).execute(ctx)
    assert delegated["num_predictions"] == len(dataset) and ctx.executor.to_json()["requests"] == []
    assert reported[-1] == 1.0 and len(reported) >= 3


def test_grouped_datasets_are_processed_as_their_active_slice(synthetic_dataset, dataset_name, tiny_checkpoint):
    """``apply_model`` refuses grouped collections: every operator works on the App's active
    slice (``target_view(require_flat=True)``), and the form's target says so."""
    grouped = fo.Dataset(dataset_name)
    grouped.add_group_field("group", default="left")
    samples = []
    for path, expression in zip(*synthetic_dataset.limit(6).values(["filepath", "expression"])):
        group = fo.Group()
        samples += [fo.Sample(filepath=path, expression=expression, group=group.element("left")),
                    fo.Sample(filepath=path, expression=expression, group=group.element("right"))]
    grouped.add_samples(samples)
    params = {"model": str(tiny_checkpoint), "label_field": "pred"}
    for name in ("apply_grounding_model", "ground_phrase", "search_phrase"):
        ctx = ExecutionContext(request_params={"dataset_name": dataset_name, "group_slice": "right",
                                               "params": {**params, "phrase": "the red circle"}})
        form = OperatorRegistry().get_operator(uri(name)).resolve_type(ctx, "inputs")
        # the system's target selector, offering flat targets only: the active slice
        choices = form.type.properties["view_target"].to_json()["view"]["choices"]
        assert any("current slice (right)" in (c["description"] or "") for c in choices if not c["disabled"]), name
        assert not any(p.invalid for p in form.type.properties.values()), name
    results, _ = execute("apply_grounding_model", dataset=grouped, group_slice="right", params=params)
    assert results["num_predictions"] == 6
    assert grouped.select_group_slices("right").count("pred.detections") == 6
    assert grouped.select_group_slices("left").count("pred.detections") == 0


def test_operators_can_be_called_from_python(dataset, tiny_checkpoint):
    apply = foo.get_operator(uri("apply_grounding_model"))
    view = dataset.match(F("split") == "test")
    result = apply(view, model=str(tiny_checkpoint), label_field="pred_called")
    assert result.result["num_predictions"] == len(view) == dataset.count("pred_called.detections")
    with pytest.raises(ExecutionError, match="not a text field"):
        apply(view, model=str(tiny_checkpoint), phrase_field="ground_truth")


def test_apply_a_zoo_model_by_name(dataset, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(fo.config, "model_zoo_dir", str(tmp_path / "zoo"))
    monkeypatch.setenv(DEMO_CHECKPOINT_ENV, str(tiny_checkpoint))
    register_local_source()  # this clone
    view = dataset.limit(4)
    foo.execute_operator(uri("apply_grounding_model"), ctx={"view": view, "params": {
        "model": "fiftyone-grounding/tiny-synthetic-demo", "label_field": "pred"}})
    assert view.count("pred.detections") == 4


@pytest.mark.parametrize("params, message", [
    ({"model": "/no/such/checkpoint"}, "neither a checkpoint folder nor a registered zoo model"),
    ({"model": "clip-vit-base32-torch"}, "is a zoo model but not a grounding one"),
    ({"phrase_field": "phrase"}, "The dataset has no field 'phrase'; its text fields are: "),
    ({"phrase_field": "ground_truth"}, "not a text field"),
    ({"label_field": "expression"}, "not a Detections field; choose another name"),
    ({"label_field": "my.field"}, "is not a valid field name"),
])
def test_bad_inputs_show_a_message_in_the_form(dataset, tiny_checkpoint, params, message):
    params = {"model": str(tiny_checkpoint), **params}
    # What the App renders: the form marks the field invalid and shows the message under it.
    ctx = ExecutionContext(request_params={"dataset_name": dataset.name, "params": params})
    operator = OperatorRegistry().get_operator(uri("apply_grounding_model"))
    form = operator.resolve_input(ctx)
    flagged = {name: p.error_message for name, p in form.type.properties.items() if p.invalid}
    assert len(flagged) == 1 and message in next(iter(flagged.values()))
    # What Python callers get: an ExecutionError that names the field and says why, no traceback.
    with pytest.raises(ExecutionError) as error:
        foo.execute_operator(uri("apply_grounding_model"), ctx={"dataset": dataset, "params": params})
    assert message in str(error.value) and "Traceback" not in str(error.value)
    assert not dataset.has_field("pred")


def test_evaluate_shows_fiftyone_and_grounding_metrics(dataset):
    dataset.set_values("predictions", [make_detections([x, y, x + w, y + h], e, confidence=1.0)
                                       for (x, y, w, h), e in zip(
                                           [b[0] for b in dataset.values("ground_truth.detections.bounding_box")],
                                           dataset.values("expression"))])
    result, _ = execute("evaluate_grounding_model", dataset=dataset, params={"eval_key": "ground"})
    n = len(dataset)
    assert result["mAP"] == pytest.approx(1.0)
    assert (result["tp"], result["fp"], result["fn"], result["count"]) == (n, 0, 0, n)
    assert result["miou"] == pytest.approx(1.0) and result["acc50"] == result["acc75"] == 1.0
    assert set(result["splits"]) == {"train", "val", "test"}
    assert "ground" in dataset.list_evaluations()
    assert dataset.bounds("ground_iou")[0] == pytest.approx(1.0)
    panel_metrics = dataset.load_evaluation_results("ground").custom_metrics
    # every box right at confidence 1: no AUROC (nothing to tell apart), no calibration error
    assert {m["label"]: m["value"] for m in panel_metrics.values()} == pytest.approx(
        {"mIoU": 1.0, "Acc@0.5": 1.0, "Acc@0.75": 1.0, "confidence ECE": 0.0,
         "Acc@0.5, 50% most confident": 1.0, "Acc@0.5, 80% most confident": 1.0})
    assert result["auroc"] is None and result["ece"] == 0.0


def test_ground_phrase_on_the_target_samples_keeps_the_users_view(dataset, tiny_checkpoint):
    selected = dataset.values("id")[5:8]
    results, requests = execute("ground_phrase", dataset=dataset, selected=selected, params={
        "phrase": "  the small red circle ", "model": str(tiny_checkpoint), "view_target": "SELECTED_SAMPLES"})
    assert results == {"label_field": "grounded", "num_boxes": 3}
    grounded = dataset.exists("grounded")
    assert grounded.values("id") == selected
    assert grounded.values("grounded.detections.expression") == [["the small red circle"]] * 3
    assert "set_view" not in request_names(requests) and "reload_dataset" in request_names(requests)

    view = dataset.match(F("split") == "val")  # the current view, the App's default target
    results, _ = execute("ground_phrase", view=view, params={"phrase": "the blue square",
                                                              "model": str(tiny_checkpoint), "label_field": "blue"})
    assert results["num_boxes"] == len(view) == dataset.count("blue.detections")


def test_ground_phrase_needs_a_phrase(dataset, tiny_checkpoint):
    with pytest.raises(ExecutionError, match="The phrase is empty") as error:
        foo.execute_operator(uri("ground_phrase"), ctx={"dataset": dataset, "params": {
            "phrase": "  ", "model": str(tiny_checkpoint)}})
    assert "Traceback" not in str(error.value)


def test_the_grounding_metrics_serve_fiftyones_own_evaluations(dataset):
    """The plugin's EvaluationMetric operators, chosen for a COCO-style evaluation (as the App's
    evaluation form offers them): computed with the run, and gone with it."""
    from fiftyone_grounding.evaluation.fiftyone_run import METRIC_URIS
    from fiftyone_grounding.evaluation.scoring import evaluate_grounding

    boxes = [b[0] for b in dataset.values("ground_truth.detections.bounding_box")]
    shifted = [[x + 0.05 * (i % 3), y, w, h] for i, (x, y, w, h) in enumerate(boxes)]
    dataset.set_values("predictions", [make_detections([x, y, x + w, y + h], e, confidence=0.3 + 0.1 * (i % 5))
                                       for i, ((x, y, w, h), e) in enumerate(zip(shifted, dataset.values("expression")))])
    results = dataset.evaluate_detections("predictions", gt_field="ground_truth", eval_key="coco",
                                          custom_metrics=list(METRIC_URIS))
    expected = evaluate_grounding(dataset, "predictions", "ground_truth", iou_field="check", print_table=False)
    computed = {m["key"]: m for m in results.custom_metrics.values()}
    assert set(computed) == {"miou", "acc50", "acc75", "auroc", "ece", "acc_at_50_coverage", "acc_at_80_coverage"}
    for key, metric in computed.items():
        assert metric["value"] == pytest.approx(expected["overall"][key]), key
    assert computed["ece"]["lower_is_better"] and not computed["miou"]["lower_is_better"]
    assert dataset.load_evaluation_results("coco").custom_metrics == results.custom_metrics
    dataset.delete_evaluation("coco")
    assert not dataset.has_field("coco_tp") and dataset.list_evaluations() == []


def test_the_generalized_metrics_serve_fiftyones_coco_evaluation_and_the_evaluate_operator(dataset_name):
    """Phrases of no, one and several objects: Pr@F1=1, N-acc and T-acc chosen for FiftyOne's own
    COCO evaluation (as the App's form offers them) are gRefCOCO's scorer's values, and the
    evaluate operator shows them."""
    from fiftyone_grounding.evaluation.fiftyone_run import GREC_METRIC_URIS
    from fiftyone_grounding.evaluation.scoring import evaluate_grec

    def boxes(*xyxys, confidences=None):
        return fo.Detections(detections=[
            fo.Detection(label="referent", bounding_box=[x0, y0, x1 - x0, y1 - y0],
                         confidence=None if confidences is None else confidences[i])
            for i, (x0, y0, x1, y1) in enumerate(xyxys)])

    a, b, c = [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9], [0.0, 0.6, 0.3, 0.95]
    ds = fo.Dataset(dataset_name)
    ds.add_samples([
        fo.Sample(filepath=f"/img/{i}.jpg", no_target=not gt, ground_truth=boxes(*gt), predictions=pred)
        for i, (gt, pred) in enumerate([
            ([a], boxes(a, confidences=[0.9])),                              # found
            ([a, b], boxes(a, b, confidences=[0.95, 0.8])),                  # both found
            ([a, b], boxes(a, c, confidences=[0.9, 0.9])),                   # one wrong
            ([], boxes(confidences=[])),                                     # nothing, no box: right
            ([], boxes(c, confidences=[0.75])),                              # nothing, a box: wrong
            ([], boxes(c, confidences=[0.5])),                               # below 0.7: no box
        ])])
    expected = evaluate_grec(ds, "predictions", "ground_truth", split_field=None, write=False)["overall"]
    # F1=1 on 0, 1, 3 (nothing found where nothing is) and 5; N-acc 2 of 3; T-acc 3 of 3
    assert (expected["pr_f1"], expected["n_acc"], expected["t_acc"]) == pytest.approx((4 / 6, 2 / 3, 1.0))
    results = ds.evaluate_detections("predictions", gt_field="ground_truth", eval_key="coco", method="coco",
                                     compute_mAP=True, custom_metrics=list(GREC_METRIC_URIS))
    computed = {m["key"]: m["value"] for m in results.custom_metrics.values()}
    assert computed == pytest.approx({key: expected[key] for key in ("pr_f1", "n_acc", "t_acc")})
    assert not ds.has_field("predictions_f1")  # a metric writes nothing
    ds.delete_evaluation("coco")

    shown, _ = execute("evaluate_grounding_model", dataset=ds, params={"eval_key": "grec"})
    assert {key: shown[key] for key in ("pr_f1", "n_acc", "t_acc")} == pytest.approx(computed)
    assert shown["mAP"] == pytest.approx(ds.load_evaluation_results("grec").mAP())


# -- models kept loaded between runs -----------------------------------------------------------------


def test_a_second_run_reuses_the_loaded_model_until_it_is_released(dataset, tiny_checkpoint, tmp_path, monkeypatch):
    """The operators load models through ``zoo.cached_model``: the second execution does not
    build the encoders again (counted at ``model.load_encoder``, which every load goes through),
    a checkpoint written again is loaded again, and the release operator frees them."""
    import fiftyone_grounding.models.build as model_module
    from fiftyone_grounding.app import zoo
    loads = []
    real = model_module.load_encoder
    monkeypatch.setattr(model_module, "load_encoder", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    zoo.release_models()
    apply = foo.get_operator("@fiftyone-grounding/grounding/apply_grounding_model")
    before = zoo.model_cache_info()
    for field in ("first", "second"):
        assert apply(dataset.limit(4), model=str(tiny_checkpoint), label_field=field).result["num_predictions"] == 4
    info = zoo.model_cache_info()
    assert len(loads) == 2  # the image and the text encoder, once
    assert (info["misses"] - before["misses"], info["hits"] - before["hits"]) == (1, 1)
    assert info["models"] == [str(tiny_checkpoint.resolve())]
    assert dataset.values("first.detections.bounding_box")[:4] == dataset.values("second.detections.bounding_box")[:4]

    release = foo.get_operator("@fiftyone-grounding/grounding/release_grounding_models")
    assert release().result == {"released": 1} and zoo.model_cache_info()["models"] == []
    apply(dataset.limit(4), model=str(tiny_checkpoint), label_field="third")
    assert len(loads) == 4  # loaded again after the release

    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    zoo.cached_model(copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes())  # the same folder written again
    zoo.cached_model(copy)
    assert len(loads) == 8 and len(zoo.model_cache_info()["models"]) == zoo.MODEL_CACHE_SIZE


@pytest.fixture
def no_demo(monkeypatch):
    """Neither a demo checkpoint recorded in FiftyOne's execution store (the key is put back
    after) nor one named by the environment."""
    from fiftyone_grounding.app.zoo import DEMO_CHECKPOINT_KEY, _store

    monkeypatch.delenv(DEMO_CHECKPOINT_ENV, raising=False)
    store = _store()
    saved = store.get(DEMO_CHECKPOINT_KEY)
    store.delete(DEMO_CHECKPOINT_KEY)
    yield
    if saved is None:
        store.delete(DEMO_CHECKPOINT_KEY)
    else:
        store.set(DEMO_CHECKPOINT_KEY, saved)


def _model_field(dataset):
    """The apply form's model field as the App shows it: (default, error message or None)."""
    ctx = ExecutionContext(request_params={"dataset_name": dataset.name, "params": {}})
    field = OperatorRegistry().get_operator(uri("apply_grounding_model")).resolve_input(ctx).type.properties["model"]
    return field.default, field.error_message if field.invalid else None


def test_the_forms_default_model_is_the_latest_training_run_else_the_demos_never_a_relative_path(
        synthetic_dataset, dataset_name, tiny_checkpoint, tmp_path, no_demo, monkeypatch):
    """The model a form offers: the best/ of the training run last started on the dataset whose
    checkpoint exists, else the demo's recorded checkpoint; both by absolute path, whatever the
    working directory of the process that reads them (the App's server has its own)."""
    from fiftyone_grounding.runs import record_training_start
    from fiftyone_grounding.app.zoo import NO_DEFAULT_MODEL, record_demo_checkpoint

    dataset = synthetic_dataset.limit(4).clone(dataset_name)
    for key in dataset.list_runs():
        dataset.delete_run(key)
    assert _model_field(dataset) == (None, NO_DEFAULT_MODEL)  # nothing trained, no demo: say what to do

    monkeypatch.chdir(tmp_path)
    for folder in ("demo/best", "runs/a/best"):
        shutil.copytree(tiny_checkpoint, folder)
    record_demo_checkpoint("demo/best")  # relative here: recorded absolute
    monkeypatch.chdir(tmp_path / "runs")  # another process's working directory
    assert _model_field(dataset) == (str(tmp_path / "demo" / "best"), None)

    monkeypatch.chdir(tmp_path)
    record_training_start(dataset, {}, "runs/a", "runs/a/best")
    assert dataset.get_run_info(dataset.list_runs()[0]).config.checkpoint == str(tmp_path / "runs" / "a" / "best")
    assert _model_field(dataset) == (str(tmp_path / "runs" / "a" / "best"), None)  # the dataset's own model first
    record_training_start(dataset, {}, "runs/b", "runs/b/best")  # started, no checkpoint yet
    assert _model_field(dataset)[0] == str(tmp_path / "runs" / "a" / "best")
    shutil.copytree(tiny_checkpoint, "runs/b/best")
    assert _model_field(dataset)[0] == str(tmp_path / "runs" / "b" / "best")  # the latest
    shutil.rmtree("runs/b/best")
    shutil.rmtree("runs/a/best")
    assert _model_field(dataset)[0] == str(tmp_path / "demo" / "best")  # gone: the demo's again

    # the CLI's apply takes the same default
    monkeypatch.chdir(tmp_path / "runs")
    from fiftyone_grounding.cli import main

    main(["apply", "--dataset", dataset_name, "--label-field", "cli"])
    assert dataset.count("cli.detections") == 4


DISTRIBUTED = {"apply_grounding_model", "ground_phrase", "search_phrase", "score_label_errors"}


def test_the_operators_whose_work_splits_by_samples_declare_it_and_each_task_writes_only_its_batch(
        dataset, tiny_checkpoint, monkeypatch):
    """``allow_distributed_execution`` (open-source FiftyOne's OperatorConfig keeps it False: the
    flag is read from what the operators ask for). A deployment that splits a run gives each task
    its batch as the target view: two tasks on two halves write the boxes of one run, each only
    on its own samples."""
    import numpy as np

    asked = {}

    class Recorder(foo.OperatorConfig):
        def __init__(self, name, **kwargs):
            asked[name] = kwargs.get("allow_distributed_execution", False)
            super().__init__(name, **kwargs)

    monkeypatch.setattr(foo, "OperatorConfig", Recorder)
    registered = [op for op in OperatorRegistry().list_operators() if op.plugin_name == PLUGIN]
    for op in registered:
        op.config
    assert {name for name, yes in asked.items() if yes} == DISTRIBUTED
    monkeypatch.undo()

    ids = dataset.values("id")
    halves = [ids[::2], ids[1::2]]
    params = {"model": str(tiny_checkpoint), "label_field": "tasks"}
    for k, half in enumerate(halves):
        execute("apply_grounding_model", view=dataset.select(half), params=params)
        assert set(dataset.exists("tasks").values("id")) == set(ids[::2] if k == 0 else ids)
    execute("apply_grounding_model", dataset=dataset, params={**params, "label_field": "whole"})
    tasks, whole = dataset.values("tasks.detections.bounding_box"), dataset.values("whole.detections.bounding_box")
    np.testing.assert_allclose(np.asarray(tasks), np.asarray(whole), atol=1e-6)


def test_apply_then_evaluate_is_one_pipeline(dataset, tiny_checkpoint):
    view = dataset.match(F("split") == "val")
    execute("apply_then_evaluate", view=view, params={"model": str(tiny_checkpoint), "label_field": "piped",
                                                      "eval_key": "piped_eval"})
    assert dataset.count("piped.detections") == len(view) < len(dataset)
    assert "piped_eval" in dataset.list_evaluations() and view.exists("piped_eval_iou").count() == len(view)


def test_label_errors_in_two_steps_as_tasks_then_once(dataset, tiny_checkpoint):
    """The score step as two tasks (two halves of the samples), then the calibration once, through
    the pipeline operator: every annotation scored, P(wrong) on all of them."""
    ids = dataset.values("id")
    params = {"model": str(tiny_checkpoint)}
    parts = []
    for half in (ids[::2], ids[1::2]):
        results, _ = execute("score_label_errors", view=dataset.select(half), params=params)
        assert results["scored"] + results["left_out"] == len(half)  # left out: the model's training split
        parts.append(results["scored"])
    scored = dataset.exists("label_error_signals").count()
    assert scored == sum(parts) and min(parts) > 0
    results, _ = execute("calibrate_label_errors", dataset=dataset, params=params)
    assert results["scored"] == scored == dataset.exists("label_error").count()
    assert "label errors (label_error)" in dataset.list_saved_views()

    dataset.delete_sample_fields(["label_error", "label_error_signals"])
    execute("find_label_errors_at_scale", dataset=dataset, params={**params, "field": "piped_error"})
    assert dataset.exists("piped_error").count() == scored
