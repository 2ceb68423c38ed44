"""The FiftyOne plugin ``@fiftyone-grounding/grounding``: this folder is what FiftyOne loads.

``fiftyone-grounding install-plugin`` (and ``fiftyone-grounding demo``) links it into FiftyOne's
plugins folder as ``<plugins_dir>/@fiftyone-grounding/grounding``, where ``fiftyone plugins
download`` would put it; ``fiftyone plugins download <repository URL>`` finds it here too (the
only ``fiftyone.yml`` of the repository). FiftyOne imports this file under a name of its own
(``fiftyone.plugins.orgs...``) and calls ``register(p)``; everything else lives in the
``fiftyone_grounding`` package, which must be installed (``pip install fiftyone-grounding``).
"""

import os
import sys

try:
    import fiftyone_grounding  # noqa: F401  (cheap: the package imports its modules lazily)
except ImportError:  # this folder inside a clone that was not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))


def register(p):
    """Register this plugin's operators and panel (plugin hook)."""
    from fiftyone_grounding.app.registry import OPERATORS, PANELS

    for operator in OPERATORS + PANELS:
        p.register(operator)
