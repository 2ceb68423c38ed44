"""Everything the plugin registers (``plugin/__init__.py``: ``register``), in one place: the
operators of ``operators.py`` (with the grounding metrics'), the label-QA operator and the panel."""

from .label_error_operators import LABEL_ERROR_OPERATORS
from .operators import OPERATORS as GROUNDING_OPERATORS
from .panels import PANELS

OPERATORS = GROUNDING_OPERATORS + LABEL_ERROR_OPERATORS

__all__ = ["OPERATORS", "PANELS"]
