"""FiftyOne App operators: thin forms over the library, one library call each.

Registered by the repository's root ``__init__.py`` and listed in ``fiftyone.yml``
(plugin ``@fiftyone-grounding/grounding``). ``resolve_input`` builds the form and checks
it (fields exist with the right type, the checkpoint exists), so a bad value shows as a
message in the form, not a traceback. Operators configured like FiftyOne's own: light and
dark icons, a ``risk_level`` (MEDIUM where they write fields, HIGH where they create datasets
or files), the App's Execute / Schedule choice (``allow_delegated_execution``; training is
scheduled by default), the samples from the system's target selector (dataset, current view
or selected samples; grouped datasets as their active slice: ``ctx.target_view(require_flat=True)``).

An immediate run streams its progress to the App (``execute_as_generator``: the work runs in
a thread while ``set_progress`` messages go out), then reloads what it changed and shows its
output; a delegated run reports progress with ``ctx.set_progress`` and touches no App. The
models come from ``zoo.cached_model``: the second run starts at once. Every operator also
runs from Python::

    import fiftyone.operators as foo

    apply = foo.get_operator("@fiftyone-grounding/grounding/apply_grounding_model")
    apply(view, model="runs/tiny/best", label_field="predictions").result

Parameters left out take the defaults that the form shows. The forms' checks are in
``forms.py``, the thread that streams progress in ``streaming.py``, the grounding metrics'
operators in ``metric_operators.py`` (listed in :data:`OPERATORS` too), and the options of the
zoo models in FiftyOne's "Apply zoo model" form in ``zoo_form.py``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..data.fields import DEFAULT_PROMPT_FIELD, GROUNDED_FIELD, SEARCH_FIELD
from ..engine.config import TrainConfig
from ..errors import GroundingError, InputError
from ..evaluation.metrics import GREC_METRICS, METRICS
from ..devices import APPLY_BATCH_SIZE_TEXT
from ..models.config import PRESET_DESCRIPTIONS
from .forms import choices_of, field_error, fields_of_kind, flag, form, missing_dir_error, name_error, phrase_error
from .metric_operators import METRIC_OPERATORS
from .streaming import run_in_thread, shown_results

ICONS = {"light_icon": "/assets/icon-light.svg", "dark_icon": "/assets/icon-dark.svg"}  # in the plugin folder
RiskLevel = types.RiskLevel


def _config(name: str, label: str, risk_level: RiskLevel, description: Optional[str] = None,
            distributed: bool = False, **extra) -> foo.OperatorConfig:
    """A dynamic operator that runs immediately (its progress streamed to the App) or delegated.

    ``distributed``: its work splits by samples (``allow_distributed_execution``): where the
    deployment runs delegated operators as several tasks (FiftyOne Enterprise), each task gets its
    own batch of the target samples as ``ctx.target_view()``, writes only those and needs none of
    the others; open-source FiftyOne runs it as one task."""
    return foo.OperatorConfig(name=name, label=label, description=description, dynamic=True,
                              execute_as_generator=True, allow_immediate_execution=True,
                              allow_delegated_execution=True, allow_distributed_execution=distributed,
                              risk_level=risk_level, **ICONS, **extra)


class GroundingOperator(foo.Operator):
    """Shared helpers: ``DEFAULTS`` fill parameters that a caller leaves out; the
    ``model`` parameter defaults to the offline demo's checkpoint.

    Subclasses implement ``run(ctx, progress)`` (the one library call; ``progress(fraction,
    label)`` reports progress; returns the results) and, for what only an App that watches
    can use (reloading, opening a view), ``after(ctx, results)``, a generator of messages."""

    DEFAULTS: dict = {}
    STARTING = "Starting"  # the progress label until the work reports its own

    def __call__(self, sample_collection=None, **params):
        """Run from Python through FiftyOne's executor (the same validation as in the App)::

            apply = foo.get_operator("@fiftyone-grounding/grounding/apply_grounding_model")
            apply(dataset.match_tags("test"), model="runs/seed/best", label_field="predictions").result

        ``request_delegation=True`` schedules it instead. The results are in ``.result``.
        """
        ctx = {"params": params}
        if "request_delegation" in params:
            ctx["request_delegation"] = params.pop("request_delegation")
        if sample_collection is not None:
            ctx["view"] = sample_collection.view()
        execution = foo.execute_operator(self.uri, ctx=ctx)
        if execution.result is None and not execution.delegated:
            execution.result = shown_results(execution)
        return execution

    def run(self, ctx, progress: Callable[[float, str], None]) -> dict:
        raise NotImplementedError

    def after(self, ctx, results: dict):
        """What the App does after an immediate run: reload the dataset (new fields, new boxes)."""
        yield ctx.ops.reload_dataset()

    def execute(self, ctx):
        if ctx.delegated:  # no App watches: progress goes to the run's record, nothing is reloaded
            return self.run(ctx, lambda fraction, label: ctx.set_progress(progress=fraction, label=label))
        return self._stream(ctx)

    def _stream(self, ctx):
        """An immediate run: its progress, then ``after``, then the output, as App messages."""
        yield ctx.ops.set_progress(progress=0.0, label=self.STARTING)
        try:
            for kind, value in run_in_thread(lambda progress: self.run(ctx, progress)):
                if kind == "progress":
                    yield ctx.ops.set_progress(progress=value[0], label=value[1])
                else:
                    results = value
        except GroundingError as e:  # one sentence for the user; Python callers still get the error
            yield ctx.ops.notify(str(e), variant="error")
            raise
        yield from self.after(ctx, results)
        ctx.request_params["results"] = results  # as the App passes them to resolve_output
        outputs = self.resolve_output(ctx)
        if outputs is not None:
            yield ctx.ops.show_output(outputs.to_json(), results)

    def param(self, ctx, name: str):
        from .zoo import default_checkpoint

        # A pipeline stage's own parameters are in ctx.request_params: FiftyOne 1.22 runs a live
        # pipeline's stages on one context whose ctx.params stay the pipeline's.
        value = (ctx.request_params.get("params") or ctx.params).get(name)
        if value is not None:
            return value
        return default_checkpoint(ctx.dataset) if name == "model" else self.DEFAULTS.get(name)

    def field_input(self, ctx, inputs, view, name: str, label: str, kind: str, description: str,
                    new_ok: bool = False):
        prop = inputs.str(name, label=label, description=description, default=self.DEFAULTS.get(name),
                          view=choices_of(fields_of_kind(view, kind)))
        value = self.param(ctx, name)
        error = field_error(view, value, kind, new_ok=new_ok)
        if new_ok and not error and view.has_field(value):
            inputs.view(f"{name}_exists", types.Warning(label=f"{value!r} exists: its boxes on these samples are replaced"))
        return flag(prop, error)

    def model_input(self, ctx, inputs):
        from .zoo import default_checkpoint, model_error

        default = default_checkpoint(ctx.dataset)  # looked up once per form (runs, execution store)
        prop = inputs.str(
            "model", label="Model", default=default,
            description="A checkpoint folder (the best/ folder a training run wrote) or a zoo model name "
                        "such as fiftyone-grounding/tiny-synthetic-demo; by default the dataset's latest "
                        "trained model, else the demo's")
        given = ctx.params.get("model")
        return flag(prop, model_error(default if given is None else given))

    @staticmethod
    def preset_input(inputs, default: str, description: Optional[str] = None, choices=types.RadioGroup):
        """The ``preset`` field: every preset with its one-line description."""
        presets = choices()
        for value, label in PRESET_DESCRIPTIONS.items():
            presets.add_choice(value, label=f"{value}: {label}")
        return inputs.enum("preset", presets.values(), label="Preset", default=default, view=presets,
                           description=description)

    def needs_dataset(self, ctx, inputs) -> bool:
        if ctx.dataset is not None:
            return True
        prop = inputs.view("no_dataset", types.Error(label="Open a dataset first"))
        flag(prop, "This operation works on a dataset: open one (or pass ctx={'dataset': ...}).")
        return False

    @staticmethod
    def target(ctx):
        """The samples to work on, from the system's target selector (the dataset, the current
        view or the selected samples); a grouped dataset as its active slice."""
        return ctx.target_view(require_flat=True)

    def phrase_input(self, ctx, inputs):
        phrase = inputs.str("phrase", label="Phrase", required=True,
                            description="what to find, e.g. 'the small red circle on the left'")
        return flag(phrase, phrase_error(ctx.params.get("phrase")))


def _nothing_to_show(ctx, results):
    """``after`` of an operator whose work the App does not display."""
    return iter(())


class ImportGroundingDataset(GroundingOperator):
    """Create a referring-expression dataset: the synthetic shapes set, or a RefCOCO-family one
    (RefCOCO / RefCOCO+ / RefCOCOg from jxu124 or REFER files, gRefCOCO, RefCOCO-M, refcocox)."""

    DEFAULTS = {"source": "synthetic", "num_images": 200, "seed": 0, "variant": "refcoco",
                "skip_missing": False}
    STARTING = "Importing"

    @property
    def config(self):
        return _config("import_grounding_dataset", "Grounding: import a referring-expression dataset", RiskLevel.HIGH,
                       description="Creates a dataset (and the synthetic set's image files)")

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
                flag(name_prop, f"The RefCOCO importer cannot be imported ({error}); install "
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
            flag(folder, missing_dir_error(ctx.params.get("annotations_dir")))
            images = inputs.str("images_dir", label="COCO train2014 folder",
                                description="empty: fetch the needed images with FiftyOne's coco-2014 zoo dataset")
            flag(images, missing_dir_error(ctx.params.get("images_dir")))
            if self.param(ctx, "variant") != "refcocox":
                inputs.str("revision", label="Hub revision", description="empty: the tested revision")
            inputs.int("max_samples", min=1, label="Max expressions", description="empty: all")
            inputs.bool("skip_missing", label="Skip expressions whose image is missing", default=False)
        return form(inputs, "Import a grounding dataset")

    def _dataset_name(self, ctx) -> str:
        source = self.param(ctx, "source")
        default = "grounding-synthetic" if source == "synthetic" else self.param(ctx, "variant")
        return ctx.params.get("dataset_name") or default

    def run(self, ctx, progress):
        name = self._dataset_name(ctx)
        if self.param(ctx, "source") == "synthetic":
            from ..data.synthetic import make_synthetic_dataset

            dataset = make_synthetic_dataset(name, num_images=self.param(ctx, "num_images"),
                                             out_dir=ctx.params.get("images_dir") or None,
                                             seed=self.param(ctx, "seed"), progress=False)
        else:
            importer, error = _refcoco_importer()
            if importer is None:
                raise InputError(f"The RefCOCO importer cannot be imported ({error}): install fiftyone-grounding "
                                 f"with its dependencies.")
            dataset = importer(self.param(ctx, "variant"), dataset_name=name,
                               source=ctx.params.get("annotations_dir") or None,
                               images_dir=ctx.params.get("images_dir") or None,
                               revision=ctx.params.get("revision") or None,
                               max_samples=ctx.params.get("max_samples"),
                               skip_missing=self.param(ctx, "skip_missing"), progress=False)
        return {"dataset": dataset.name, "num_samples": len(dataset)}

    def after(self, ctx, results):
        yield ctx.ops.open_dataset(results["dataset"])

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("dataset", label="Dataset")
        outputs.int("num_samples", label="Samples (one per referring expression)")
        return form(outputs, "Dataset imported")


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
        from ..sources.importer import import_refcoco
    except ImportError as e:
        return None, e
    return import_refcoco, None


class TrainGroundingModel(GroundingOperator):
    """Train a grounding model on the target samples (the App schedules it by default); the run
    is recorded on the dataset (``runs.py``)."""

    DEFAULTS = {k: v for k, v in TrainConfig().to_dict().items()
                if k in ("preset", "epochs", "batch_size", "lr", "phrase_field", "gt_field", "split_field",
                         "train_split", "val_split")}
    STARTING = "Loading the samples and the encoders"
    after = staticmethod(_nothing_to_show)  # a new run record and files: nothing in the grid changes

    @property
    def config(self):
        return _config("train_grounding_model", "Grounding: train a model", RiskLevel.HIGH,
                       description="Writes checkpoints to a folder; scheduled by default (`fiftyone delegated "
                                   "launch` runs it)", default_choice_to_delegated=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return form(inputs, "Train a grounding model")
        view = self.target(ctx)
        self.preset_input(inputs, self.DEFAULTS["preset"])
        inputs.str("out_dir", label="Output folder",
                   description="checkpoints go to <folder>/best and <folder>/last. Empty: a new folder "
                               f"{self._new_out_dir(ctx, stamp='<date-time>')}. A folder holding an unfinished run "
                               "of the same dataset and options resumes it; another run there is refused")
        inputs.int("epochs", min=1, label="Epochs", default=self.DEFAULTS["epochs"])
        inputs.int("batch_size", min=1, label="Batch size", default=self.DEFAULTS["batch_size"])
        inputs.float("lr", min=0.0, label="Learning rate", default=self.DEFAULTS["lr"])
        self.field_input(ctx, inputs, view, "phrase_field", "Phrase field", "text", "the referring expression")
        self.field_input(ctx, inputs, view, "gt_field", "Ground-truth field", "Detections", "the true boxes (one per sample; any number for multi-box presets)")
        split_prop = inputs.str("split_field", label="Split field", default=self.DEFAULTS["split_field"])
        inputs.str("train_split", label="Train split", default=self.DEFAULTS["train_split"],
                   description="empty: train on the whole view")
        inputs.str("val_split", label="Validation split", default=self.DEFAULTS["val_split"],
                   description="picks the best checkpoint; empty: none")
        flag(split_prop, self._split_error(ctx, view))
        return form(inputs, "Train a grounding model")

    def _new_out_dir(self, ctx, stamp: Optional[str] = None) -> str:
        """A new run folder: grounding-runs/<dataset>-<preset>-<UTC date-time> (never one that
        exists: a second training from the App must not resume or overwrite the first)."""
        import datetime

        stamp = stamp or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = os.path.join(fo.config.default_dataset_dir, "grounding-runs",
                            f"{ctx.dataset.name}-{self.param(ctx, 'preset')}-{stamp}")
        path, n = base, 1
        while os.path.exists(path):
            n += 1
            path = f"{base}-{n}"
        return path

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

    def run(self, ctx, progress):
        from ..runs import training_run_key
        from ..engine.fit import fit

        out_dir = ctx.params.get("out_dir") or self._new_out_dir(ctx)
        result = fit(
            self.target(ctx),
            preset=self.param(ctx, "preset"),
            out_dir=out_dir,
            epochs=self.param(ctx, "epochs"),
            batch_size=self.param(ctx, "batch_size"),
            lr=self.param(ctx, "lr"),
            phrase_field=self.param(ctx, "phrase_field"),
            gt_field=self.param(ctx, "gt_field"),
            split_field=self.param(ctx, "split_field"),
            train_split=self.param(ctx, "train_split") or None,
            val_split=self.param(ctx, "val_split") or None,
            progress=False,
            progress_callback=progress,
        )
        return {"checkpoint": str(result.best_dir), "best_val_iou": result.best_val_iou,
                "epochs": len(result.history), "run_key": training_run_key(out_dir)}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("checkpoint", label="Best checkpoint (give it to 'Grounding: apply a model')")
        outputs.float("best_val_iou", label="Best validation IoU")
        outputs.int("epochs", label="Epochs trained")
        outputs.str("run_key", label="Recorded on the dataset as the run (dataset.get_run_info(key))")
        return form(outputs, "Training finished")


class ApplyGroundingModel(GroundingOperator):
    """Predict one box per sample from its own phrase, on the target samples."""

    DEFAULTS = {"phrase_field": DEFAULT_PROMPT_FIELD, "label_field": "predictions", "batch_size": None,
                "skip_existing": False}  # batch size None: default_apply_batch_size
    STARTING = "Loading the model"

    @property
    def config(self):
        return _config("apply_grounding_model", "Grounding: apply a model", RiskLevel.MEDIUM,
                       description="Writes the boxes of each sample's phrase to a Detections field", distributed=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return form(inputs, "Apply a grounding model")
        view = self.target(ctx)
        self.model_and_fields_input(self, ctx, inputs, view)
        inputs.int("batch_size", min=1, label="Batch size", required=False,
                   description=f"phrases per forward pass; empty: {APPLY_BATCH_SIZE_TEXT}")
        inputs.bool("skip_existing", label="Only samples without a prediction in this field",
                    default=False, description="finish an interrupted run instead of predicting everything again")
        return form(inputs, "Apply a grounding model")

    @staticmethod
    def model_and_fields_input(op: GroundingOperator, ctx, inputs, view) -> None:
        """The model, phrase field and prediction field of an apply form (this one, a pipeline's)."""
        op.model_input(ctx, inputs)
        op.field_input(ctx, inputs, view, "phrase_field", "Phrase field", "text",
                       "each sample's own referring expression")
        op.field_input(ctx, inputs, view, "label_field", "Prediction field", "Detections",
                       "new or existing Detections field to write the boxes to", new_ok=True)

    def run(self, ctx, progress):
        from ..inference.apply import apply_grounding_model
        from .zoo import load_grounding_model

        view = self.target(ctx)
        label_field = self.param(ctx, "label_field")
        model = load_grounding_model(self.param(ctx, "model"))
        # Decoding threads as by default (8 on a GPU): nothing forked, so also inside the App's server.
        run = apply_grounding_model(view, model, label_field=label_field, prompt_field=self.param(ctx, "phrase_field"),
                                    batch_size=self.param(ctx, "batch_size"),
                                    skip_existing=self.param(ctx, "skip_existing"), progress=False,
                                    progress_callback=progress)
        return {"label_field": label_field, "num_predictions": view.count(f"{label_field}.detections"),
                "num_skipped": len(run["skipped"]), "checkpoint": model.source}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("label_field", label="Prediction field")
        outputs.int("num_predictions", label="Samples with a box")
        outputs.int("num_skipped", label="Samples skipped (missing phrase or unreadable image)")
        outputs.str("checkpoint", label="Model (recorded on the dataset with the field)")
        return form(outputs, "Predictions written")


class EvaluateGroundingModel(GroundingOperator):
    """The grounding evaluation as a FiftyOne run: the Model Evaluation panel (mAP ranked by the
    confidence, TP/FP/FN, the split and category scenarios) and the grounding metrics."""

    DEFAULTS = {"pred_field": "predictions", "gt_field": "ground_truth", "eval_key": "eval",
                "split_field": "split"}
    STARTING = "Evaluating"

    @property
    def config(self):
        return _config("evaluate_grounding_model", "Grounding: evaluate predictions", RiskLevel.MEDIUM,
                       description="Records an evaluation run and writes its per-sample fields")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return form(inputs, "Evaluate grounding predictions")
        view = self.target(ctx)
        self.field_input(ctx, inputs, view, "pred_field", "Prediction field", "Detections", "the predicted boxes")
        self.field_input(ctx, inputs, view, "gt_field", "Ground-truth field", "Detections", "the true boxes")
        key = inputs.str("eval_key", label="Evaluation key", default=self.DEFAULTS["eval_key"],
                         description="names the run in the Model Evaluation panel; the IoU goes to <key>_iou")
        flag(key, name_error(self.param(ctx, "eval_key"), "evaluation key"))
        inputs.str("split_field", label="Split field", default=self.DEFAULTS["split_field"],
                   description="metrics per split too; empty: overall only")
        return form(inputs, "Evaluate grounding predictions")

    def run(self, ctx, progress):
        from ..evaluation.fiftyone_run import evaluate_in_fiftyone

        metrics = evaluate_in_fiftyone(
            self.target(ctx), pred_field=self.param(ctx, "pred_field"), gt_field=self.param(ctx, "gt_field"),
            eval_key=self.param(ctx, "eval_key"), split_field=self.param(ctx, "split_field") or None)
        overall = metrics["overall"]
        return {"eval_key": metrics["eval_key"], "iou_field": metrics["iou_field"], "mAP": metrics["mAP"],
                **{key: overall[key] for key, _, _ in METRICS}, "count": overall["count"], "tp": metrics["tp"],
                "fp": metrics["fp"], "fn": metrics["fn"], "splits": metrics["splits"],
                "checkpoint": metrics["checkpoint"],
                **({key: metrics["grec"]["overall"][key] for key, _, _ in GREC_METRICS} if "grec" in metrics else {})}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.float("mAP", label="mAP (IoU 0.50:0.95, ranked by the confidence)")
        generalized = [m for m in GREC_METRICS if m[0] in (ctx.results or {})]  # phrases of 0 or several objects
        for key, label, _ in generalized + [m for m in METRICS if not generalized]:
            outputs.float(key, label=label)
        for name, label in (("count", "Expressions"), ("tp", "True positives (IoU >= 0.5)"),
                            ("fp", "False positives"), ("fn", "False negatives")):
            outputs.int(name, label=label)
        outputs.str("iou_field", label="Per-sample IoU field (sort the grid by it)")
        outputs.str("eval_key", label="Evaluation key (open the Model Evaluation panel)")
        outputs.str("checkpoint", label="Model that wrote the predictions")
        return form(outputs, "Grounding evaluation")


class GroundPhrase(GroundingOperator):
    """Find one typed phrase in the target samples and draw its box on each."""

    DEFAULTS = {"label_field": GROUNDED_FIELD, "batch_size": None}  # None: default_apply_batch_size
    STARTING = "Loading the model"
    FORM = "Find a phrase"

    @property
    def config(self):
        return _config("ground_phrase", "Grounding: find a phrase", RiskLevel.MEDIUM,
                       description="Writes the box of a typed phrase on each target sample", distributed=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return form(inputs, self.FORM)
        view = self.target(ctx)
        self.phrase_input(ctx, inputs)
        self.model_input(ctx, inputs)
        self.field_input(ctx, inputs, view, "label_field", "Box field", "Detections",
                         "where the found boxes are written", new_ok=True)
        return form(inputs, self.FORM)

    def run(self, ctx, progress):
        from ..inference.apply import ground_phrase
        from .zoo import load_grounding_model

        label_field = self.param(ctx, "label_field")
        num_boxes = ground_phrase(self.target(ctx), ctx.params["phrase"], load_grounding_model(self.param(ctx, "model")),
                                  label_field=label_field, batch_size=self.param(ctx, "batch_size"), progress=False,
                                  progress_callback=progress)
        return {"label_field": label_field, "num_boxes": num_boxes}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("label_field", label="Box field")
        outputs.int("num_boxes", label="Samples with a box")
        return form(outputs, "Boxes written")


class SearchPhrase(GroundPhrase):
    """Where a typed phrase is in every target image, the images ranked by the model's confidence:
    the boxes go to a field and the App opens the samples sorted, most likely first."""

    DEFAULTS = {"label_field": SEARCH_FIELD, "batch_size": None}
    FORM = "Search the images for a phrase"

    @property
    def config(self):
        return _config("search_phrase", "Grounding: search for a phrase", RiskLevel.MEDIUM,
                       description="Finds a typed phrase in every image and sorts them by confidence",
                       distributed=True)  # each task ranks its own batch; the App's sort is a view of all

    def run(self, ctx, progress):
        from ..inference.search import search_phrase
        from .zoo import load_grounding_model

        label_field = self.param(ctx, "label_field")
        ranked = search_phrase(self.target(ctx), ctx.params["phrase"], load_grounding_model(self.param(ctx, "model")),
                               label_field=label_field, batch_size=self.param(ctx, "batch_size"), progress=False,
                               progress_callback=progress)
        top = ranked.limit(1).values(f"{label_field}.detections.confidence")
        return {"label_field": label_field, "num_boxes": ranked.count(f"{label_field}.detections"),
                "top_confidence": max(top[0]) if top and top[0] else None,
                "sort_by": f"{label_field}.detections.confidence"}

    def after(self, ctx, results):
        from ..inference.search import rank_by_confidence

        yield ctx.ops.reload_dataset()
        yield ctx.ops.set_view(rank_by_confidence(self.target(ctx), results["label_field"]))

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("label_field", label="Box field")
        outputs.int("num_boxes", label="Samples with a box")
        outputs.float("top_confidence", label="Confidence of the most likely image")
        outputs.str("sort_by", label="Sorted by (descending)")
        return form(outputs, "Images ranked by the phrase")


class ReleaseGroundingModels(GroundingOperator):
    """Free the grounding models that the App's server keeps loaded between runs."""

    STARTING = "Releasing"
    after = staticmethod(_nothing_to_show)

    @property
    def config(self):
        return _config("release_grounding_models", "Grounding: release cached models", RiskLevel.LOW,
                       description="Frees the memory of the models kept loaded between runs")

    def resolve_input(self, ctx):
        from .zoo import model_cache_info

        inputs = types.Object()
        kept = model_cache_info()["models"]
        inputs.view("kept", types.Notice(label=f"{len(kept)} model(s) loaded: " + (", ".join(kept) or "none")))
        return form(inputs, "Release the cached grounding models")

    def run(self, ctx, progress):
        from .zoo import release_models

        return {"released": release_models()}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("released", label="Models released (the next run loads its model again)")
        return form(outputs, "Models released")


OPERATORS = (ImportGroundingDataset, TrainGroundingModel, ApplyGroundingModel, EvaluateGroundingModel,
             GroundPhrase, SearchPhrase, ReleaseGroundingModels) + METRIC_OPERATORS
