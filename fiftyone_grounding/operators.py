"""FiftyOne App operators: thin forms over the library, one library call each.

Registered by the repository's root ``__init__.py`` and listed in ``fiftyone.yml``
(plugin ``@fiftyone-grounding/grounding``). ``resolve_input`` builds the form and checks
it (fields exist with the right type, the checkpoint exists), so a bad value shows as a
message in the form, not a traceback. Every operator also runs from Python::

    import fiftyone.operators as foo

    foo.execute_operator(
        "@fiftyone-grounding/grounding/apply_grounding_model",
        ctx={"view": view, "params": {"model": "runs/tiny/best", "label_field": "predictions"}},
    )

Parameters left out take the defaults that the form shows.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from .config import APPLY_BATCH_SIZE_TEXT, PRESET_DESCRIPTIONS, TrainConfig
from .evaluate import METRICS

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _is_text(field) -> bool:
    return isinstance(field, fo.StringField)


def _is_detections(field) -> bool:
    return isinstance(field, fo.EmbeddedDocumentField) and issubclass(field.document_type, fo.Detections)


FIELD_KINDS = {"text": _is_text, "Detections": _is_detections}


def _fields_of_kind(view, kind: str) -> list[str]:
    return sorted(name for name, field in view.get_field_schema().items() if FIELD_KINDS[kind](field))


def name_error(name, what: str) -> Optional[str]:
    """Why ``name`` cannot be a field name or evaluation key (``what``), or None."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return f"{name!r} is not a valid {what}: use letters, digits and underscores, starting with a letter."
    return None


def field_error(view, name, kind: str, new_ok: bool = False) -> Optional[str]:
    """Why ``name`` is not a ``kind`` field of ``view`` (or, with ``new_ok``, a name for a new one), or None."""
    error = name_error(name, "field name")
    if error:
        return error
    field = view.get_field_schema().get(name)
    if field is None:
        if new_ok:
            return None
        existing = ", ".join(_fields_of_kind(view, kind)) or "none"
        return f"The dataset has no field {name!r}; its {kind} fields are: {existing}."
    if not FIELD_KINDS[kind](field):
        advice = "; choose another name" if new_ok else ""
        return f"{name!r} is a {type(field).__name__}, not a {kind} field{advice}."
    return None


def _flag(prop, error: Optional[str]):
    """Show ``error`` under the form field ``prop``; the form cannot run while it is set."""
    if error:
        prop.invalid = True
        prop.error_message = error
    return prop


def _config(name: str, label: str, **extra) -> foo.OperatorConfig:
    """A dynamic operator that can run immediately or be delegated."""
    return foo.OperatorConfig(name=name, label=label, dynamic=True, allow_immediate_execution=True,
                              allow_delegated_execution=True, **extra)


def _progress_callback(ctx):
    """``progress_callback(fraction, label)`` for the library: the operator's progress bar."""
    return lambda fraction, label: ctx.set_progress(progress=fraction, label=label)


def _form(inputs, label: str):
    return types.Property(inputs, view=types.View(label=label))


class GroundingOperator(foo.Operator):
    """Shared helpers: ``DEFAULTS`` fill parameters that a caller leaves out; the
    ``model`` parameter defaults to the offline demo's checkpoint."""

    DEFAULTS: dict = {}

    def __call__(self, sample_collection=None, **params):
        """Run from Python through FiftyOne's executor (the same validation as in the App)::

            apply = foo.get_operator("@fiftyone-grounding/grounding/apply_grounding_model")
            apply(dataset.match_tags("test"), model="runs/seed/best", label_field="predictions")
        """
        ctx = {"params": params}
        if sample_collection is not None:
            ctx["view"] = sample_collection.view()
        return foo.execute_operator(self.uri, ctx=ctx)

    def param(self, ctx, name: str):
        from .zoo import demo_checkpoint_dir

        value = ctx.params.get(name)
        if value is not None:
            return value
        return str(demo_checkpoint_dir()) if name == "model" else self.DEFAULTS.get(name)

    def field_input(self, ctx, inputs, view, name: str, label: str, kind: str, description: str,
                    new_ok: bool = False):
        choices = types.AutocompleteView()
        for field in _fields_of_kind(view, kind):
            choices.add_choice(field, label=field)
        prop = inputs.str(name, label=label, description=description, default=self.DEFAULTS.get(name),
                          view=choices)
        value = self.param(ctx, name)
        error = field_error(view, value, kind, new_ok=new_ok)
        if new_ok and not error and view.has_field(value):
            inputs.view(f"{name}_exists", types.Warning(label=f"{value!r} exists: its boxes on these samples are replaced"))
        return _flag(prop, error)

    def model_input(self, ctx, inputs):
        from .zoo import demo_checkpoint_dir, model_error

        prop = inputs.str(
            "model", label="Model", default=str(demo_checkpoint_dir()),
            description="A checkpoint folder (the best/ folder a training run wrote) or a zoo model name "
                        "such as fiftyone-grounding/tiny-synthetic-demo")
        return _flag(prop, model_error(self.param(ctx, "model")))

    def needs_dataset(self, ctx, inputs) -> bool:
        if ctx.dataset is not None:
            return True
        prop = inputs.view("no_dataset", types.Error(label="Open a dataset first"))
        _flag(prop, "This operation works on a dataset: open one (or pass ctx={'dataset': ...}).")
        return False


class ImportGroundingDataset(GroundingOperator):
    """Create a referring-expression dataset: the synthetic shapes set, or a RefCOCO-family one
    (RefCOCO / RefCOCO+ / RefCOCOg from jxu124 or REFER files, gRefCOCO, RefCOCO-M, refcocox)."""

    DEFAULTS = {"source": "synthetic", "num_images": 200, "seed": 0, "variant": "refcoco",
                "skip_missing": False}

    @property
    def config(self):
        return _config("import_grounding_dataset", "Grounding: import a referring-expression dataset")

    def resolve_input(self, ctx):
        inputs = types.Object()
        sources = types.RadioGroup()
        sources.add_choice("synthetic", label="Synthetic shapes",
                           description="drawn here, no download: phrases like 'the small red circle on the left'")
        sources.add_choice("refcoco", label="RefCOCO family",
                           description="RefCOCO / RefCOCO+ / RefCOCOg, gRefCOCO, RefCOCO-M or refcocox: annotations "
                                       "from the Hugging Face Hub or a local folder, COCO train2014 images")
        inputs.enum("source", sources.values(), label="Source", default="synthetic", view=sources)
        source = self.param(ctx, "source")
        name_prop = inputs.str("dataset_name", label="Dataset name", default=self._dataset_name(ctx))
        if source == "synthetic":
            inputs.int("num_images", min=1, label="Images", default=self.DEFAULTS["num_images"],
                       description="two expressions each; split 80/10/10 into train/val/test")
            inputs.int("seed", label="Seed", default=self.DEFAULTS["seed"])
            inputs.str("images_dir", label="Image folder",
                       description="where the PNG files go; empty: FiftyOne's dataset folder")
            if fo.dataset_exists(self._dataset_name(ctx)):
                inputs.view("exists", types.Notice(label="This dataset exists: it is opened unchanged."))
        else:
            importer, error = _refcoco_importer()
            if importer is None:
                _flag(name_prop, f"The RefCOCO importer cannot be imported ({error}); install "
                                 f"fiftyone-grounding with its dependencies.")
            variants = types.Dropdown()
            for variant, text in VARIANT_LABELS.items():
                variants.add_choice(variant, label=variant, description=text)
            inputs.enum("variant", variants.values(), label="Variant", default="refcoco", view=variants)
            folder = inputs.str("annotations_dir", label="Annotations folder",
                                description="a REFER or gRefCOCO folder (instances.json + refs file), a "
                                            "save_to_disk copy of jxu124's dataset, a RefCOCO-M copy, or for "
                                            "refcocox a folder of refcoco/, refcoco+/, refcocog/; empty: download "
                                            "from the Hugging Face Hub")
            _flag(folder, _missing_dir(ctx.params.get("annotations_dir")))
            images = inputs.str("images_dir", label="COCO train2014 folder",
                                description="empty: fetch the needed images with FiftyOne's coco-2014 zoo dataset")
            _flag(images, _missing_dir(ctx.params.get("images_dir")))
            if self.param(ctx, "variant") != "refcocox":
                inputs.str("revision", label="Hub revision", description="empty: the tested revision")
            inputs.int("max_samples", min=1, label="Max expressions", description="empty: all")
            inputs.bool("skip_missing", label="Skip expressions whose image is missing", default=False)
        return _form(inputs, "Import a grounding dataset")

    def _dataset_name(self, ctx) -> str:
        source = self.param(ctx, "source")
        default = "grounding-synthetic" if source == "synthetic" else self.param(ctx, "variant")
        return ctx.params.get("dataset_name") or default

    def execute(self, ctx):
        name = self._dataset_name(ctx)
        if self.param(ctx, "source") == "synthetic":
            from .synthetic import make_synthetic_dataset

            dataset = make_synthetic_dataset(name, num_images=self.param(ctx, "num_images"),
                                             out_dir=ctx.params.get("images_dir") or None,
                                             seed=self.param(ctx, "seed"), progress=False)
        else:
            importer, error = _refcoco_importer()
            if importer is None:
                raise RuntimeError(f"The RefCOCO importer cannot be imported: {error}")
            dataset = importer(self.param(ctx, "variant"), dataset_name=name,
                               source=ctx.params.get("annotations_dir") or None,
                               images_dir=ctx.params.get("images_dir") or None,
                               revision=ctx.params.get("revision") or None,
                               max_samples=ctx.params.get("max_samples"),
                               skip_missing=self.param(ctx, "skip_missing"), progress=False)
        if not ctx.delegated:
            ctx.ops.open_dataset(dataset.name)
        return {"dataset": dataset.name, "num_samples": len(dataset)}


VARIANT_LABELS = {
    "refcoco": "RefCOCO (UNC splits)",
    "refcoco+": "RefCOCO+ (UNC splits)",
    "refcocog": "RefCOCOg (UMD splits)",
    "grefcoco": "gRefCOCO: zero, one or several objects per expression",
    "refcoco-m": "RefCOCO-M: RefCOCO val with pixel-accurate masks (Voxel51/RefCOCO-M, images included)",
    "refcocox": "RefCOCO + RefCOCO+ + RefCOCOg, train minus every val/test image",
}


def _refcoco_importer():
    """``(import_refcoco, None)``, or ``(None, the ImportError)`` where it cannot be imported."""
    try:
        from .refcoco import import_refcoco
    except ImportError as e:
        return None, e
    return import_refcoco, None


def _missing_dir(path) -> Optional[str]:
    if path and not os.path.isdir(os.path.expanduser(path)):
        return f"There is no folder {path!r}; give an existing folder or leave it empty."
    return None


class TrainGroundingModel(GroundingOperator):
    """Train a grounding model on the current dataset or view (delegated by default)."""

    DEFAULTS = {**{k: v for k, v in TrainConfig().to_dict().items()
                   if k in ("preset", "epochs", "batch_size", "lr", "phrase_field", "gt_field", "split_field",
                            "train_split", "val_split")},
                "delegate": True}

    @property
    def config(self):
        return _config("train_grounding_model", "Grounding: train a model", default_choice_to_delegated=True)

    def resolve_delegation(self, ctx):
        return bool(self.param(ctx, "delegate"))

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return _form(inputs, "Train a grounding model")
        view = ctx.target_view()
        presets = types.RadioGroup()
        for value, label in PRESET_DESCRIPTIONS.items():
            presets.add_choice(value, label=f"{value}: {label}")
        inputs.enum("preset", presets.values(), label="Preset", default=self.DEFAULTS["preset"], view=presets)
        inputs.str("out_dir", label="Output folder", default=self._out_dir(ctx),
                   description="checkpoints go to <folder>/best and <folder>/last; an unfinished run there resumes")
        inputs.int("epochs", min=1, label="Epochs", default=self.DEFAULTS["epochs"])
        inputs.int("batch_size", min=1, label="Batch size", default=self.DEFAULTS["batch_size"])
        inputs.float("lr", min=0.0, label="Learning rate", default=self.DEFAULTS["lr"])
        self.field_input(ctx, inputs, view, "phrase_field", "Phrase field", "text", "the referring expression")
        self.field_input(ctx, inputs, view, "gt_field", "Ground-truth field", "Detections", "one true box per sample")
        split_prop = inputs.str("split_field", label="Split field", default=self.DEFAULTS["split_field"])
        inputs.str("train_split", label="Train split", default=self.DEFAULTS["train_split"],
                   description="empty: train on the whole view")
        inputs.str("val_split", label="Validation split", default=self.DEFAULTS["val_split"],
                   description="picks the best checkpoint; empty: none")
        _flag(split_prop, self._split_error(ctx, view))
        inputs.bool("delegate", label="Run in the background (delegated)", default=True,
                    description="needs `fiftyone delegated launch` running; a run inside the App stops after 600 s")
        return _form(inputs, "Train a grounding model")

    def _out_dir(self, ctx) -> str:
        if ctx.params.get("out_dir"):
            return ctx.params["out_dir"]
        return os.path.join(fo.config.default_dataset_dir, "grounding-runs",
                            f"{ctx.dataset.name}-{self.param(ctx, 'preset')}")

    def _split_error(self, ctx, view) -> Optional[str]:
        splits = [self.param(ctx, "train_split"), self.param(ctx, "val_split")]
        if not any(splits):
            return None
        split_field = self.param(ctx, "split_field")
        error = field_error(view, split_field, "text")
        if error:
            return f"{error} Clear the train and validation splits to train on the whole view."
        counts = view.count_values(split_field)
        train_split = splits[0]
        if train_split and not counts.get(train_split):
            return f"No samples have {split_field} == {train_split!r}; the splits here: {sorted(counts, key=str)}."
        return None

    def execute(self, ctx):
        from .train import fit

        result = fit(
            ctx.target_view(),
            preset=self.param(ctx, "preset"),
            out_dir=self._out_dir(ctx),
            epochs=self.param(ctx, "epochs"),
            batch_size=self.param(ctx, "batch_size"),
            lr=self.param(ctx, "lr"),
            phrase_field=self.param(ctx, "phrase_field"),
            gt_field=self.param(ctx, "gt_field"),
            split_field=self.param(ctx, "split_field"),
            train_split=self.param(ctx, "train_split") or None,
            val_split=self.param(ctx, "val_split") or None,
            progress=False,
            progress_callback=_progress_callback(ctx),
        )
        return {"checkpoint": str(result.best_dir), "best_val_iou": result.best_val_iou,
                "epochs": len(result.history)}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("checkpoint", label="Best checkpoint (give it to 'Grounding: apply a model')")
        outputs.float("best_val_iou", label="Best validation IoU")
        outputs.int("epochs", label="Epochs trained")
        return _form(outputs, "Training finished")


class ApplyGroundingModel(GroundingOperator):
    """Predict one box per sample from its own phrase, on the current view or the selected samples."""

    DEFAULTS = {"phrase_field": "expression", "label_field": "predictions", "batch_size": None,
                "skip_existing": False}  # batch size None: config.default_apply_batch_size

    @property
    def config(self):
        return _config("apply_grounding_model", "Grounding: apply a model")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return _form(inputs, "Apply a grounding model")
        view = ctx.target_view()
        self.model_input(ctx, inputs)
        self.field_input(ctx, inputs, view, "phrase_field", "Phrase field", "text",
                         "each sample's own referring expression")
        self.field_input(ctx, inputs, view, "label_field", "Prediction field", "Detections",
                         "new or existing Detections field to write the boxes to", new_ok=True)
        inputs.int("batch_size", min=1, label="Batch size", required=False,
                   description=f"phrases per forward pass; empty: {APPLY_BATCH_SIZE_TEXT}")
        inputs.bool("skip_existing", label="Only samples without a prediction in this field",
                    default=False, description="finish an interrupted run instead of predicting everything again")
        return _form(inputs, "Apply a grounding model")

    def execute(self, ctx):
        from .apply import apply_grounding_model
        from .zoo import load_grounding_model

        view = ctx.target_view()
        label_field = self.param(ctx, "label_field")
        # Decoding threads as by default (8 on a GPU): nothing forked, so also inside the App's server.
        run = apply_grounding_model(view, load_grounding_model(self.param(ctx, "model")), label_field=label_field,
                                    prompt_field=self.param(ctx, "phrase_field"),
                                    batch_size=self.param(ctx, "batch_size"),
                                    skip_existing=self.param(ctx, "skip_existing"), progress=False,
                                    progress_callback=_progress_callback(ctx))
        ctx.ops.reload_dataset()
        return {"label_field": label_field, "num_predictions": view.count(f"{label_field}.detections"),
                "num_skipped": len(run["skipped"])}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("label_field", label="Prediction field")
        outputs.int("num_predictions", label="Samples with a box")
        outputs.int("num_skipped", label="Samples skipped (missing phrase or unreadable image)")
        return _form(outputs, "Predictions written")


class EvaluateGroundingModel(GroundingOperator):
    """The grounding evaluation as a FiftyOne run: the Model Evaluation panel (mAP ranked by the
    confidence, TP/FP/FN, the split and category scenarios) and the grounding metrics."""

    DEFAULTS = {"pred_field": "predictions", "gt_field": "ground_truth", "eval_key": "eval",
                "split_field": "split"}

    @property
    def config(self):
        return _config("evaluate_grounding_model", "Grounding: evaluate predictions")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return _form(inputs, "Evaluate grounding predictions")
        view = ctx.target_view()
        self.field_input(ctx, inputs, view, "pred_field", "Prediction field", "Detections", "the predicted boxes")
        self.field_input(ctx, inputs, view, "gt_field", "Ground-truth field", "Detections", "the true boxes")
        key = inputs.str("eval_key", label="Evaluation key", default=self.DEFAULTS["eval_key"],
                         description="names the run in the Model Evaluation panel; the IoU goes to <key>_iou")
        _flag(key, name_error(self.param(ctx, "eval_key"), "evaluation key"))
        inputs.str("split_field", label="Split field", default=self.DEFAULTS["split_field"],
                   description="metrics per split too; empty: overall only")
        return _form(inputs, "Evaluate grounding predictions")

    def execute(self, ctx):
        from .evaluate import evaluate_in_fiftyone

        metrics = evaluate_in_fiftyone(
            ctx.target_view(), pred_field=self.param(ctx, "pred_field"), gt_field=self.param(ctx, "gt_field"),
            eval_key=self.param(ctx, "eval_key"), split_field=self.param(ctx, "split_field") or None)
        ctx.ops.reload_dataset()
        overall = metrics["overall"]
        return {"eval_key": metrics["eval_key"], "iou_field": metrics["iou_field"], "mAP": metrics["mAP"],
                **{key: overall[key] for key, _, _ in METRICS}, "count": overall["count"], "tp": metrics["tp"],
                "fp": metrics["fp"], "fn": metrics["fn"], "splits": metrics["splits"]}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.float("mAP", label="mAP (IoU 0.50:0.95, ranked by the confidence)")
        for key, label, _ in METRICS:
            outputs.float(key, label=label)
        for name, label in (("count", "Expressions"), ("tp", "True positives (IoU >= 0.5)"),
                            ("fp", "False positives"), ("fn", "False negatives")):
            outputs.int(name, label=label)
        outputs.str("iou_field", label="Per-sample IoU field (sort the grid by it)")
        outputs.str("eval_key", label="Evaluation key (open the Model Evaluation panel)")
        return _form(outputs, "Grounding evaluation")


class GroundingMetric(foo.EvaluationMetric):
    """One grounding metric (``KEY`` of ``evaluate.METRICS``) of a detection evaluation run: it is
    offered in the App's evaluation form and computed, renamed and deleted with the run."""

    KEY = ""
    LABEL = ""
    LOWER_IS_BETTER = False

    @property
    def config(self):
        config = foo.EvaluationMetricConfig(
            name=self.KEY, label=self.LABEL, eval_types=["detection"], lower_is_better=self.LOWER_IS_BETTER,
            description=f"{self.LABEL} of each sample's first predicted box against its first true box",
            unlisted=True)  # a metric of evaluation runs, not an operation of the operator browser
        # FiftyOne reads this flag from the config's kwargs when it stores the value
        config.kwargs["lower_is_better"] = self.LOWER_IS_BETTER
        return config

    def compute(self, samples, results, **kwargs):
        from .evaluate import metric_value

        return metric_value(samples, results, self.KEY)


METRIC_OPERATORS = tuple(
    type(f"GroundingMetric_{key}", (GroundingMetric,), {"KEY": key, "LABEL": label, "LOWER_IS_BETTER": lower})
    for key, label, lower in METRICS)


class GroundPhrase(GroundingOperator):
    """Find a typed phrase in the selected samples and show them with the box."""

    DEFAULTS = {"label_field": "grounded", "batch_size": None}  # None: config.default_apply_batch_size

    @property
    def config(self):
        return foo.OperatorConfig(
            name="ground_phrase",
            label="Grounding: find a phrase in the selected samples",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return _form(inputs, "Find a phrase")
        phrase = inputs.str("phrase", label="Phrase", required=True,
                            description="what to find, e.g. 'the small red circle on the left'")
        if ctx.params.get("phrase") is not None and not str(ctx.params["phrase"]).strip():
            _flag(phrase, "The phrase is empty: type what to find.")
        self.model_input(ctx, inputs)
        self.field_input(ctx, inputs, ctx.dataset, "label_field", "Box field", "Detections",
                         "where the found boxes are written", new_ok=True)
        if ctx.selected:
            inputs.view("selection", types.Notice(label=f"Searching {len(ctx.selected)} selected samples"))
        else:
            selection = inputs.view("selection", types.Error(label="No samples selected"))
            _flag(selection, "Select the samples to search first (tick them in the grid).")
        return _form(inputs, "Find a phrase in the selected samples")

    def execute(self, ctx):
        from .apply import ground_phrase
        from .zoo import load_grounding_model

        selection = ctx.dataset.select(ctx.selected)
        label_field = self.param(ctx, "label_field")
        num_boxes = ground_phrase(selection, ctx.params["phrase"], load_grounding_model(self.param(ctx, "model")),
                                  label_field=label_field, batch_size=self.param(ctx, "batch_size"))
        ctx.ops.reload_dataset()
        ctx.ops.set_view(selection)
        return {"label_field": label_field, "num_boxes": num_boxes}


OPERATORS = (ImportGroundingDataset, TrainGroundingModel, ApplyGroundingModel, EvaluateGroundingModel,
             GroundPhrase) + METRIC_OPERATORS
