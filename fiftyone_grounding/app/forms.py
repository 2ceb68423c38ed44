"""The parts of the operators' forms: field kinds, the checks of what a user typed, the message
under a field.

Each check returns why a value cannot be used (one sentence that says what to do) or None;
:func:`flag` shows it under its form field, and the App will not run a form with one shown.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

import fiftyone as fo
import fiftyone.operators.types as types

from ..data.text import clean_phrase

NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
EMPTY_PHRASE = "The phrase is empty: type what to find."


def _is_text(field) -> bool:
    return isinstance(field, fo.StringField)


def _is_detections(field) -> bool:
    return isinstance(field, fo.EmbeddedDocumentField) and issubclass(field.document_type, fo.Detections)


FIELD_KINDS = {"text": _is_text, "Detections": _is_detections}


def fields_of_kind(view, kind: str) -> list[str]:
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
        existing = ", ".join(fields_of_kind(view, kind)) or "none"
        return f"The dataset has no field {name!r}; its {kind} fields are: {existing}."
    if not FIELD_KINDS[kind](field):
        advice = "; choose another name" if new_ok else ""
        return f"{name!r} is a {type(field).__name__}, not a {kind} field{advice}."
    return None


def phrase_error(phrase) -> Optional[str]:
    """Why a typed ``phrase`` cannot be grounded (it is empty), or None (also when none is typed yet)."""
    if phrase is not None and clean_phrase(phrase) is None:
        return EMPTY_PHRASE
    return None


def missing_dir_error(path) -> Optional[str]:
    """Why ``path`` (optional) is not a folder, or None."""
    if path and not os.path.isdir(os.path.expanduser(path)):
        return f"There is no folder {path!r}; give an existing folder or leave it empty."
    return None


def flag(prop, error: Optional[str]):
    """Show ``error`` under the form field ``prop``; the form cannot run while it is set."""
    if error:
        prop.invalid = True
        prop.error_message = error
    return prop


def choices_of(values: Iterable[str]) -> types.AutocompleteView:
    """A text field's suggestions: ``values``, each labelled with itself."""
    choices = types.AutocompleteView()
    for value in values:
        choices.add_choice(value, label=value)
    return choices


def form(inputs, label: str):
    """The form (or output) ``inputs`` under the title ``label``."""
    return types.Property(inputs, view=types.View(label=label))
