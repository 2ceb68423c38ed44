"""Operator pipelines (FiftyOne's ``PipelineOperator``): several operators run as one, in order,
each stage on the same target samples.

- "Grounding: apply, then evaluate": the apply stage (distributed where the deployment splits
  delegated runs into tasks), then the evaluation run, once, on every sample.
- "Grounding: find label errors over many workers": the score stage (distributed), then the
  calibration, once, on every sample.

``tasks`` asks the deployment for that many parallel tasks for the first stage
(``PipelineStage.num_distributed_tasks``; FiftyOne Enterprise's delegated runs use it, open-source
FiftyOne runs the stages one after the other in one process).
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..data.fields import DEFAULT_PROMPT_FIELD
from .forms import flag, form, name_error
from .label_error_operators import ScoreLabelErrors, label_error_form, label_error_options
from .operators import ICONS, ApplyGroundingModel, EvaluateGroundingModel, GroundingOperator, RiskLevel


def _pipeline_config(name: str, label: str, description: str) -> foo.OperatorConfig:
    return foo.OperatorConfig(name=name, label=label, description=description, dynamic=True,
                              allow_immediate_execution=True, allow_delegated_execution=True,
                              default_choice_to_delegated=True, risk_level=RiskLevel.MEDIUM, **ICONS)


class GroundingPipeline(foo.PipelineOperator, GroundingOperator):
    """A pipeline whose form reuses the grounding operators' fields; ``stages(ctx)`` names its
    stages as ``(operator name, params, distributed)``."""

    def tasks_input(self, inputs) -> None:
        inputs.int("tasks", min=1, label="Parallel tasks", required=False,
                    description="for the first stage, where scheduled runs can be split (FiftyOne Enterprise); "
                                "empty: the deployment's default")

    def stages(self, ctx) -> list:
        raise NotImplementedError

    def resolve_pipeline(self, ctx):
        plugin = self.uri.rsplit("/", 1)[0]
        tasks = ctx.params.get("tasks")
        pipeline = types.Pipeline()
        for name, params, distributed in self.stages(ctx):
            pipeline.stage(f"{plugin}/{name}", params=params, name=name,
                           num_distributed_tasks=tasks if distributed else None)
        return pipeline


class ApplyThenEvaluate(GroundingPipeline):
    """Apply a model to the target samples, then evaluate its boxes, as one scheduled run."""

    DEFAULTS = {**ApplyGroundingModel.DEFAULTS, **EvaluateGroundingModel.DEFAULTS}
    FORM = "Apply a grounding model, then evaluate it"

    @property
    def config(self):
        return _pipeline_config("apply_then_evaluate", "Grounding: apply, then evaluate",
                                "Writes the boxes of each sample's phrase (over many workers where the deployment "
                                "allows), then records the evaluation run")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if not self.needs_dataset(ctx, inputs):
            return form(inputs, self.FORM)
        view = self.target(ctx)
        ApplyGroundingModel.model_and_fields_input(self, ctx, inputs, view)
        self.field_input(ctx, inputs, view, "gt_field", "Ground-truth field", "Detections", "the true boxes")
        key = inputs.str("eval_key", label="Evaluation key", default=self.DEFAULTS["eval_key"],
                         description="names the run in the Model Evaluation panel")
        flag(key, name_error(self.param(ctx, "eval_key"), "evaluation key"))
        self.tasks_input(inputs)
        return form(inputs, self.FORM)

    def stages(self, ctx) -> list:
        label_field = self.param(ctx, "label_field")
        apply = {"model": self.param(ctx, "model"), "phrase_field": self.param(ctx, "phrase_field"),
                 "label_field": label_field, "skip_existing": bool(self.param(ctx, "skip_existing"))}
        evaluate = {"pred_field": label_field, "gt_field": self.param(ctx, "gt_field"),
                    "eval_key": self.param(ctx, "eval_key"), "split_field": self.param(ctx, "split_field")}
        return [("apply_grounding_model", apply, True), ("evaluate_grounding_model", evaluate, False)]


class FindLabelErrorsAtScale(GroundingPipeline):
    """Score every annotation of the target samples over many workers, then calibrate once."""

    DEFAULTS = {**ScoreLabelErrors.DEFAULTS, "phrase_field": DEFAULT_PROMPT_FIELD}
    FORM = "Find label errors over many workers"

    @property
    def config(self):
        return _pipeline_config("find_label_errors_at_scale", "Grounding: find label errors over many workers",
                                "Scores each annotation with a trained model (over many workers where the "
                                "deployment allows), then calibrates P(wrong) once on every sample")

    def resolve_input(self, ctx):
        return label_error_form(self, ctx, more=self.tasks_input)

    def stages(self, ctx) -> list:
        params = {"model": self.param(ctx, "model"), **label_error_options(self, ctx)}
        return [("score_label_errors", params, True), ("calibrate_label_errors", params, False)]


PIPELINES = (ApplyThenEvaluate, FindLabelErrorsAtScale)
