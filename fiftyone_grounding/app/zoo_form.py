"""The options of this repository's zoo models in FiftyOne's "Apply zoo model" form.

The zoo source's ``resolve_input`` and ``parse_parameters`` (the repository root's
``__init__.py``) call :func:`zoo_model_inputs` and :func:`parse_zoo_parameters`: where the
phrases come from, a text field of the dataset or one typed phrase; the zoo form has its own
confidence threshold and batch size, which it passes to ``apply_model``.
"""

from __future__ import annotations

import fiftyone.operators.types as types

from ..data.fields import DEFAULT_PROMPT_FIELD
from ..data.text import clean_phrase
from ..errors import InputError
from ..devices import APPLY_BATCH_SIZE_TEXT
from .forms import EMPTY_PHRASE, choices_of, field_error, fields_of_kind, flag, phrase_error

PHRASE_SOURCES = {"field": "Each sample's own phrase, from a text field",
                  "phrase": "One typed phrase, for every sample"}


def zoo_model_inputs(ctx):
    """The options of a grounding zoo model in FiftyOne's Apply zoo model form (the zoo source's
    ``resolve_input``; the zoo operator puts them under ``remote_params``): where the phrases
    come from (a text field of the dataset, or one typed phrase). The confidence threshold and
    the batch size are the zoo form's own fields (it passes them to ``apply_model``)."""
    params = ctx.params.get("remote_params") or {}
    inputs = types.Object()
    sources = types.RadioGroup()
    for value, label in PHRASE_SOURCES.items():
        sources.add_choice(value, label=label)
    inputs.enum("phrase_source", sources.values(), label="Phrases", default="field", view=sources)
    if params.get("phrase_source", "field") == "field":
        fields = fields_of_kind(ctx.dataset, "text") if ctx.dataset is not None else []
        default = DEFAULT_PROMPT_FIELD if DEFAULT_PROMPT_FIELD in fields else None
        prop = inputs.str("prompt_field", label="Phrase field", default=default, required=True,
                          view=choices_of(fields),
                          description="the text field holding each sample's referring expression")
        name = params.get("prompt_field", default)
        if ctx.dataset is not None and name is not None:
            flag(prop, field_error(ctx.dataset, name, "text"))
    else:
        prop = inputs.str("prompt", label="Phrase", required=True,
                          description="what to find in every image, e.g. 'the red car on the left'")
        flag(prop, phrase_error(params.get("prompt")))
    inputs.view("batch_size_hint", types.Notice(
        label=f"Batch size: set this form's Batch size below ({APPLY_BATCH_SIZE_TEXT} run fastest); empty runs "
              f"one sample at a time"))
    return types.Property(inputs)


def parse_zoo_parameters(ctx, params: dict) -> None:
    """The zoo form's values -> ``load_zoo_model`` keyword arguments, in place (the zoo source's
    ``parse_parameters``): ``prompt_field=...`` or ``prompt=...``."""
    source = params.pop("phrase_source", "field")
    field, prompt = params.pop("prompt_field", None), params.pop("prompt", None)
    params.pop("batch_size_hint", None)
    if source == "phrase":
        text = clean_phrase(prompt)
        if text is None:
            raise InputError(EMPTY_PHRASE)
        params["prompt"] = text
    else:
        params["prompt_field"] = field or DEFAULT_PROMPT_FIELD
