"""This repository as a FiftyOne remote model-zoo source (``manifest.json`` beside this file).

FiftyOne imports this file as the zoo source's module: ``download_model`` / ``load_model``, and
``resolve_input`` / ``parse_parameters``, with which FiftyOne's "Apply zoo model" operator asks
for the phrase source. Everything here delegates to the ``fiftyone_grounding`` package: the
installed one, or the copy beside this file when the repository was fetched by
``foz.register_zoo_model_source``. The FiftyOne plugin (operators and panel) is the folder
``fiftyone_grounding/plugin/``.
"""

import os
import sys

try:
    import fiftyone_grounding  # noqa: F401  (cheap: the package imports its modules lazily)
except ImportError:  # a downloaded copy of the repository, not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def download_model(model_name, model_path):
    """Fetch the checkpoint of ``model_name`` for ``model_path`` (remote-zoo hook)."""
    from fiftyone_grounding.app import zoo
    zoo.download_model(model_name, model_path)


def load_model(model_name, model_path, **kwargs):
    """The ``GroundingModel`` of a downloaded zoo model (remote-zoo hook)."""
    from fiftyone_grounding.app import zoo
    return zoo.load_model(model_name, model_path, **kwargs)


def resolve_input(model_name, ctx):
    """The model's options in the "Apply zoo model" form: the phrase field or one typed phrase
    (the form has its own confidence threshold) (remote-zoo hook)."""
    from fiftyone_grounding.app.zoo_form import zoo_model_inputs

    return zoo_model_inputs(ctx)


def parse_parameters(model_name, ctx, params):
    """Turn that form's values into ``load_model`` keyword arguments, in place (remote-zoo hook)."""
    from fiftyone_grounding.app.zoo_form import parse_zoo_parameters

    parse_zoo_parameters(ctx, params)
