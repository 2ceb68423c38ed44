"""fiftyone-grounding as a FiftyOne plugin (``fiftyone.yml``) and a remote model-zoo source (``manifest.json``).

FiftyOne imports this file in two roles: the plugin entry point (``register(p)``) and the
zoo-source module (``download_model`` / ``load_model``). Everything here delegates to the
``fiftyone_grounding`` package: the installed one, or the copy beside this file when the
repository was fetched by ``fiftyone plugins download`` or ``foz.register_zoo_model_source``.
"""

import os
import sys

try:
    import fiftyone_grounding  # noqa: F401  (cheap: the package imports its modules lazily)
except ImportError:  # a downloaded copy of the repository, not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def download_model(model_name, model_path):
    """Fetch the checkpoint of ``model_name`` for ``model_path`` (remote-zoo hook)."""
    from fiftyone_grounding import zoo

    zoo.download_model(model_name, model_path)


def load_model(model_name, model_path, **kwargs):
    """The ``GroundingModel`` of a downloaded zoo model (remote-zoo hook)."""
    from fiftyone_grounding import zoo

    return zoo.load_model(model_name, model_path, **kwargs)


def register(p):
    """Register this plugin's operators (plugin hook)."""
    from fiftyone_grounding.operators import OPERATORS

    for operator in OPERATORS:
        p.register(operator)
