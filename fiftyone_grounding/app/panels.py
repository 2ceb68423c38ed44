"""The grounding panel: type a phrase in the sample modal and see its box (FiftyOne App code, thin).

A Python panel (``fiftyone.yml``: ``panels``) for the modal. Typing a phrase grounds it on the
sample the modal shows, with the chosen model, and draws the box (``config.PREVIEW_FIELD``)
with its confidence, and its IoU with the ground-truth box where the sample has one. **Keep**
moves the box into a field, **Clear** removes it, **Search the dataset** opens the search
operator with the phrase. Moving to another sample grounds the phrase there (and clears the
previous sample's preview). A multi-box model draws every box it keeps (none where the phrase
refers to nothing).

On a sample that "Find label errors" scored, the panel also shows its P(wrong), kind and driver,
draws the annotation beside the model's box (``label_error_box``), and offers the two review
answers (``qa/review.py``): **Annotation is right** and **Use the model's box**; after a review
it shows how many of the reviewed flags were wrong annotations. The first time on a dataset the panel declares its preview field and asks to
reopen the sample: FiftyOne's open modal does not see fields added after it opened.

FiftyOne's panel text boxes send their value when typing pauses (there is no Enter event),
so the phrase is grounded then; the model comes from ``zoo.cached_model`` and is loaded once.
Each action calls one function of ``search.py`` (its boxes post-processed as every apply path's:
``inference/postprocess.py``); the state lives in ``ctx.panel.state``.
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..data.fields import GROUNDED_FIELD, PREVIEW_FIELD
from ..errors import GroundingError
from .operators import ICONS
from .forms import fields_of_kind
from ..data.text import clean_phrase
from ..fiftyone_api import root_dataset

GT_FIELD = "ground_truth"  # the ground truth the panel compares with, where the dataset has it
LABEL_ERROR_FIELD = "label_error"  # compute_label_errors' default field (the panel reads the latest run's)
PANEL_HELP = """Type a phrase: its box is drawn on this sample (field `{preview}`) with the model's
confidence, and its IoU with the ground truth when the sample has one. **Keep** copies the box to a
field; **Search the dataset** ranks every image by the phrase."""


# The App's modal reads the dataset's fields when it opens: a field added while it is open is not drawn
FIRST_USE = ("This dataset now has the preview field `{preview}` that this panel draws its boxes in: close "
             "this sample and open it again (once) to see them.")


def _format_result(result: dict, gt_field) -> str:
    """One line: the phrase, the box's confidence, its IoU with the ground truth."""
    if not result.get("boxes"):
        return f"**{result['phrase']}**: no box (below the confidence threshold, or the image cannot be read)"
    parts = [f"**{result['phrase']}**"]
    if result["boxes"] > 1:  # a multi-box model: the figures are its most confident box's
        parts.append(f"{result['boxes']} boxes, the most confident:")
    if result.get("confidence") is not None:
        parts.append(f"confidence {result['confidence']:.2f}")
    if result.get("iou") is not None:
        parts.append(f"IoU with {gt_field} {result['iou']:.2f}")
    return " · ".join(parts)


def _format_label_error(info: dict) -> str:
    """One line: P(wrong), its kind and driver, and the review answer if there is one."""
    line = f"**P(wrong) {info['score']:.2f}**"
    if info.get("kind"):
        line += f" · {info['kind']}"
    if info.get("driver"):
        line += f" (driven by {info['driver'].replace('_', ' ')})"
    line += f" · the annotation and the model's box (`{info.get('field', LABEL_ERROR_FIELD)}_box`) are drawn"
    if info.get("reviewed"):
        line += f" · reviewed: {info['reviewed']}"
    return line


class GroundingPanel(foo.Panel):
    """Ground a typed phrase on the current sample of the modal."""

    @property
    def config(self):
        return foo.PanelConfig(name="grounding_panel", label="Grounding", surfaces="modal",
                               help_markdown=PANEL_HELP.format(preview=PREVIEW_FIELD), **ICONS)

    # -- events ------------------------------------------------------------------------------

    def on_load(self, ctx):
        from .zoo import default_checkpoint

        state = ctx.panel.state
        if state.model is None:
            state.model = default_checkpoint(ctx.dataset) or ""
        if state.keep_field is None:
            state.keep_field = GROUNDED_FIELD
        if state.gt_field is None:
            detections = fields_of_kind(ctx.dataset, "Detections")
            state.gt_field = GT_FIELD if GT_FIELD in detections else None
        samples = self._samples(ctx)
        if not samples.has_field(PREVIEW_FIELD):  # declared before the modal draws: it then knows the field
            from ..inference.apply import declare_detections_field

            declare_detections_field(root_dataset(samples), PREVIEW_FIELD)
            ctx.ops.reload_dataset()
            state.message = FIRST_USE.format(preview=PREVIEW_FIELD)
        self._label_error(ctx)
        if clean_phrase(state.phrase):
            self._ground(ctx)

    def on_change_phrase(self, ctx):
        # The App has put the typed value in the panel's state already: setting it again here
        # would, with the events of several typing pauses in flight, put an older phrase back
        # into the box as their replies come in.
        self._ground(ctx)

    def on_change_model(self, ctx):
        ctx.panel.state.model = ctx.params.get("value")
        self._ground(ctx)

    def on_change_keep_field(self, ctx):
        ctx.panel.state.keep_field = ctx.params.get("value")

    def on_change_current_sample(self, ctx):
        """The modal moved to another sample (or closed): the phrase follows it."""
        self._clear_previous(ctx)
        self._label_error(ctx)
        self._ground(ctx)

    def on_unload(self, ctx):
        self._clear_previous(ctx)

    # -- label errors --------------------------------------------------------------------------

    def _label_error(self, ctx) -> None:
        """The current sample's label-error score, kind and driver, in the panel's state (None
        where it was not scored), with the annotation and the model's box drawn."""
        from ..runs import latest_label_errors

        state = ctx.panel.state
        state.label_error = None
        samples = self._samples(ctx)
        scoring = latest_label_errors(samples) or {"field": LABEL_ERROR_FIELD, "gt_field": None}
        name = scoring["field"]
        if not ctx.current_sample or not samples.has_field(name):
            return
        try:
            sample = samples[ctx.current_sample]
        except KeyError:
            return
        score = sample[name]
        if score is None:
            return
        get = lambda suffix: sample[name + suffix] if sample.has_field(name + suffix) else None  # noqa: E731
        gt_field = scoring["gt_field"] or state.gt_field or GT_FIELD
        state.label_error = {"score": float(score), "kind": get("_kind"), "driver": get("_driver"),
                             "reviewed": get("_reviewed"), "field": name, "gt_field": gt_field}
        shown = [gt_field, f"{name}_box"]
        ctx.ops.set_active_fields(fields=list(dict.fromkeys(list(ctx.active_fields or []) + shown)))

    def annotation_is_right(self, ctx):
        from ..qa.review import mark_right

        field = (ctx.panel.state.label_error or {}).get("field", LABEL_ERROR_FIELD)
        self._review(ctx, lambda samples, sample_id: mark_right(samples, sample_id, field=field))

    def use_model_box(self, ctx):
        from ..qa.review import use_model_box

        scoring = ctx.panel.state.label_error or {}
        self._review(ctx, lambda samples, sample_id: use_model_box(
            samples, sample_id, gt_field=scoring.get("gt_field", GT_FIELD), field=scoring.get("field", LABEL_ERROR_FIELD)))

    def _review(self, ctx, answer) -> None:
        from ..qa.review import review_line, review_precision

        if not ctx.current_sample:
            return
        samples = self._samples(ctx)
        try:
            answer(samples, ctx.current_sample)
        except GroundingError as e:
            ctx.panel.state.message = str(e)
            return
        field = (ctx.panel.state.label_error or {}).get("field", LABEL_ERROR_FIELD)
        ctx.panel.state.message = review_line(review_precision(root_dataset(samples), field=field))
        self._label_error(ctx)
        ctx.ops.reload_samples()

    def ground(self, ctx):
        self._ground(ctx)

    def keep(self, ctx):
        from ..inference.search import keep_box

        state = ctx.panel.state
        if not ctx.current_sample:
            return
        try:
            count = keep_box(self._samples(ctx), ctx.current_sample, (state.result or {}).get("model"),
                             keep_field=state.keep_field or GROUNDED_FIELD)
        except GroundingError as e:
            state.message = str(e)
            return
        state.message = f"Kept in `{state.keep_field}` ({count} box(es) there on this sample)"
        state.result = None
        ctx.ops.reload_dataset()

    def clear(self, ctx):
        self._clear_previous(ctx)
        ctx.panel.state.message = None
        ctx.ops.reload_samples()

    def search(self, ctx):
        state = ctx.panel.state
        ctx.prompt(f"{self.plugin_name}/search_phrase", params={"phrase": state.phrase or "", "model": state.model})

    # -- work --------------------------------------------------------------------------------

    @staticmethod
    def _samples(ctx):
        return ctx.flatten_group_slices()  # a grouped dataset: the modal's slice

    def _clear_previous(self, ctx):
        from ..inference.search import clear_box

        state = ctx.panel.state
        previous = (state.result or {}).get("sample_id")
        if previous:
            clear_box(self._samples(ctx), previous)
        state.result = None

    def _ground(self, ctx):
        from ..inference.search import ground_in_sample
        from .zoo import load_grounding_model

        state = ctx.panel.state
        phrase = clean_phrase(state.phrase)
        if not phrase or not ctx.current_sample:
            return
        if (state.result or {}).get("sample_id") not in (None, ctx.current_sample):
            self._clear_previous(ctx)
        samples = self._samples(ctx)
        try:
            model = load_grounding_model(state.model)
            result = ground_in_sample(samples, ctx.current_sample, phrase, model, gt_field=state.gt_field)
        except GroundingError as e:
            state.message = str(e)
            return
        state.result = {**result, "sample_id": ctx.current_sample, "model": model.source}
        state.message = None
        ctx.ops.reload_samples()
        # the modal's own active fields (the App sets those while the modal is open)
        ctx.ops.set_active_fields(fields=list(dict.fromkeys(list(ctx.active_fields or []) + [PREVIEW_FIELD])))

    # -- layout ------------------------------------------------------------------------------

    def render(self, ctx):
        state = ctx.panel.state
        panel = types.Object()
        panel.str("phrase", label="Phrase", on_change=self.on_change_phrase,
                  description="what to find on this sample, e.g. 'the small red circle on the left'")
        if state.result:
            # not name="result": a view shows the panel state's value of its name (the result dict)
            panel.md(_format_result(state.result, state.gt_field), name="result_line")
        if state.label_error:
            panel.md(_format_label_error(state.label_error), name="label_error_line")
            review = panel.h_stack("review", align_x="left", gap=2)
            review.btn("annotation_is_right", label="Annotation is right", on_click=self.annotation_is_right)
            review.btn("use_model_box", label="Use the model's box", on_click=self.use_model_box)
        if state.message:
            panel.md(state.message, name="message")
        buttons = panel.h_stack("actions", align_x="left", gap=2)
        buttons.btn("keep", label="Keep", on_click=self.keep, variant="contained",
                    disabled=not state.result or not state.result.get("boxes"))
        buttons.btn("clear", label="Clear", on_click=self.clear, disabled=not state.result)
        buttons.btn("search", label="Search the dataset", on_click=self.search, disabled=not clean_phrase(state.phrase))
        panel.str("keep_field", label="Keep in field", on_change=self.on_change_keep_field,
                  description="the Detections field that Keep writes to")
        panel.str("model", label="Model", on_change=self.on_change_model,
                  description="a checkpoint folder, a training run's folder or a zoo model name")
        return types.Property(panel, view=types.GridView(orientation="vertical", align_x="left", gap=2))


PANELS = (GroundingPanel,)
