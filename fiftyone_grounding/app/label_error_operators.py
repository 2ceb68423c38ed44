"""The App's label-QA operators: "Grounding: find label errors" (scheduled by default), and its
two steps for many workers: "score annotations" (distributed: each task its own batch of samples)
then "calibrate label errors" (once, the whole view); ``pipelines.py`` chains them.

It runs ``qa.label_errors.compute_label_errors`` on the target samples: with a trained model
(the samples it did not train on), or by training models on image-disjoint folds of the view. The
samples at least half likely wrong get the ``suspect`` tag; the ranking (most likely wrong first)
is saved as the view "label errors (<field>)", and an App that watches opens it at once; the
Grounding panel then shows each sample's annotation beside the model's box, with the score and
kind, and the two review answers.
"""

from __future__ import annotations

import fiftyone.operators.types as types

from ..data.fields import DEFAULT_PROMPT_FIELD
from ..models.config import DEFAULT_PRESET
from .forms import flag, form, name_error
from .operators import GroundingOperator, RiskLevel, _config, _nothing_to_show

CHECKPOINT, FOLDS = "checkpoint", "folds"


class FindLabelErrors(GroundingOperator):
    """Score every annotation of the target samples with the probability that it is wrong."""

    DEFAULTS = {"how": CHECKPOINT, "preset": DEFAULT_PRESET, "folds": 5, "epochs": 10,
                "phrase_field": DEFAULT_PROMPT_FIELD, "gt_field": "ground_truth", "field": "label_error"}
    STARTING = "Loading the samples"

    @property
    def config(self):
        return _config("find_label_errors", "Grounding: find label errors", RiskLevel.MEDIUM,
                       description="Scores each annotation with the probability that it is wrong, tags the likely "
                                   "ones 'suspect' and sorts the view by it; scheduled by default",
                       default_choice_to_delegated=True)

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return form(inputs, "Find label errors")
        view = self.target(ctx)
        how = types.RadioGroup()
        how.add_choice(CHECKPOINT, label="With a trained model: score the samples it did not train on")
        how.add_choice(FOLDS, label="Train models on image-disjoint folds of these samples; each scores the fold "
                                    "it did not see (every sample scored)")
        inputs.enum("how", how.values(), label="Predictions from", default=CHECKPOINT, view=how)
        if self.param(ctx, "how") == FOLDS:
            self.preset_input(inputs, self._preset(ctx), "by default the preset of the dataset's latest trained model",
                              choices=types.Dropdown)
            inputs.int("folds", min=2, label="Folds", default=self.DEFAULTS["folds"],
                       description="models trained; each on the other folds' images")
            inputs.int("epochs", min=1, label="Epochs per fold", default=self.DEFAULTS["epochs"])
        else:
            self.model_input(ctx, inputs)
        label_error_fields(self, ctx, inputs, view)
        return form(inputs, "Find label errors")

    def _preset(self, ctx) -> str:
        """The preset given, else that of the model the forms offer (the dataset's latest trained
        one, else the demo's), else the default preset."""
        from ..models.checkpoint import load_config
        from .zoo import default_checkpoint

        if ctx.params.get("preset"):
            return ctx.params["preset"]
        checkpoint = default_checkpoint(ctx.dataset)
        return load_config(checkpoint).preset if checkpoint else DEFAULT_PRESET

    def run(self, ctx, progress):
        from ..qa.label_errors import compute_label_errors
        from .zoo import load_grounding_model

        how = self.param(ctx, "how")
        options = dict(phrase_field=self.param(ctx, "phrase_field"), gt_field=self.param(ctx, "gt_field"),
                       field=self.param(ctx, "field"), progress=False, progress_callback=progress)
        if how == FOLDS:
            import os

            import fiftyone as fo

            out_dir = os.path.join(fo.config.default_dataset_dir, "grounding-runs",
                                   f"{ctx.dataset.name}-label-errors-{options['field']}")
            result = compute_label_errors(self.target(ctx), preset=self._preset(ctx),
                                          folds=self.param(ctx, "folds"), out_dir=out_dir,
                                          train_options={"epochs": self.param(ctx, "epochs")}, **options)
        else:
            result = compute_label_errors(self.target(ctx), model=load_grounding_model(self.param(ctx, "model")),
                                          **options)
        return self.finish(ctx, result)

    @staticmethod
    def finish(ctx, result) -> dict:
        # a scheduled run opens no view: the ranking is saved, for the App's saved-views menu
        saved = f"label errors ({result.field})"
        ctx.dataset.save_view(saved, result.view, overwrite=True)
        return {"field": result.field, "scored": result.scored, "suspects": result.suspects,
                "error_rate": result.error_rate, "summary": result.summary(), "saved_view": saved}

    def after(self, ctx, results):
        yield ctx.ops.reload_dataset()
        yield ctx.ops.set_view(self.target(ctx).sort_by(results["field"], reverse=True))

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("summary", label="Result")
        outputs.int("scored", label="Annotations scored")
        outputs.int("suspects", label="Tagged 'suspect' (P(wrong) >= 0.5)")
        outputs.float("error_rate", label="Estimated share of wrong annotations")
        outputs.str("saved_view", label="Saved view (the ranking, most likely wrong first)")
        return form(outputs, "Label errors scored: the view is sorted by P(wrong)")


class ScoreLabelErrors(GroundingOperator):
    """Step 1 of finding label errors at scale: the signals of each annotation of the target
    samples under a trained model. Distributed: each task scores its own batch of samples
    (``qa.label_errors.score_label_errors``); "Grounding: calibrate label errors" then runs once."""

    DEFAULTS = {"phrase_field": DEFAULT_PROMPT_FIELD, "gt_field": "ground_truth", "field": "label_error"}
    STARTING = "Loading the model"
    FORM = "Score annotations (label errors, step 1 of 2)"
    after = staticmethod(_nothing_to_show)

    @property
    def config(self):
        return _config("score_label_errors", "Grounding: score annotations (label errors, step 1)",
                       RiskLevel.MEDIUM, distributed=True,
                       description="Step 1 of 2 of finding label errors over many workers: each annotation's "
                                   "signals under a trained model; then 'calibrate label errors'")

    def resolve_input(self, ctx):
        return label_error_form(self, ctx)

    def run(self, ctx, progress):
        from ..qa.label_errors import score_label_errors
        from .zoo import load_grounding_model

        part = score_label_errors(self.target(ctx), load_grounding_model(self.param(ctx, "model")),
                                  **label_error_options(self, ctx), progress=False, progress_callback=progress)
        return {"scored": part["scored"], "left_out": part["left_out"]}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("scored", label="Annotations scored")
        outputs.int("left_out", label="Left out (the model trained on them, or on their image)")
        return form(outputs, "Scored: run 'Grounding: calibrate label errors' once every part is done")


class CalibrateLabelErrors(FindLabelErrors):
    """Step 2 of finding label errors at scale, once for the whole view after step 1 scored all of
    it: the score's classifier fitted on injected errors, each annotation's P(wrong) written."""

    FORM = "Calibrate label errors (step 2 of 2)"

    @property
    def config(self):
        return _config("calibrate_label_errors", "Grounding: calibrate label errors (step 2)", RiskLevel.MEDIUM,
                       description="Step 2 of 2: P(wrong) of every annotation that step 1 scored, the suspects "
                                   "tagged and the view sorted by it")

    def resolve_input(self, ctx):
        return label_error_form(self, ctx)

    def run(self, ctx, progress):
        from ..qa.label_errors import calibrate_label_errors
        from .zoo import load_grounding_model

        result = calibrate_label_errors(self.target(ctx), load_grounding_model(self.param(ctx, "model")),
                                        **label_error_options(self, ctx), progress=False,
                                        progress_callback=progress)
        return self.finish(ctx, result)


def label_error_form(op: GroundingOperator, ctx, more=None):
    """The form of a label-error step: the model, the fields (and ``more(inputs)``)."""
    inputs = types.Object()
    if not op.needs_dataset(ctx, inputs):
        return form(inputs, op.FORM)
    op.model_input(ctx, inputs)
    label_error_fields(op, ctx, inputs, op.target(ctx))
    if more is not None:
        more(inputs)
    return form(inputs, op.FORM)


def label_error_options(op: GroundingOperator, ctx) -> dict:
    """The phrase, annotation and score fields a label-error step was given."""
    return {name: op.param(ctx, name) for name in ("phrase_field", "gt_field", "field")}


def label_error_fields(op: GroundingOperator, ctx, inputs, view) -> None:
    """The phrase, annotation and score fields of the label-error forms."""
    op.field_input(ctx, inputs, view, "phrase_field", "Phrase field", "text", "each sample's referring expression")
    op.field_input(ctx, inputs, view, "gt_field", "Annotation field", "Detections",
                   "the annotated box (one per sample) to check")
    prop = inputs.str("field", label="Score field", default=op.DEFAULTS["field"],
                      description="P(wrong) goes here; its kind, driver and the model's box beside it "
                                  "(<field>_kind, <field>_driver, <field>_box)")
    flag(prop, name_error(op.param(ctx, "field"), "field name"))


LABEL_ERROR_OPERATORS = (FindLabelErrors, ScoreLabelErrors, CalibrateLabelErrors)
