"""Everything the plugin registers (``plugin/__init__.py``: ``register``), in one place: the
operators of ``operators.py`` (with the grounding metrics'), the label-QA operators, the
pipelines and the panel."""

from .label_error_operators import LABEL_ERROR_OPERATORS
from .operators import OPERATORS as GROUNDING_OPERATORS
from .panels import PANELS
from .pipelines import PIPELINES

OPERATORS = GROUNDING_OPERATORS + LABEL_ERROR_OPERATORS + PIPELINES

__all__ = ["OPERATORS", "PANELS"]
