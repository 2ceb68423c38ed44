"""The grounding metrics as FiftyOne ``EvaluationMetric`` operators: the App's evaluation form
offers them for detection runs, and FiftyOne computes, renames and deletes them with the run.

One operator per metric of ``metrics.METRICS`` (the first box of each sample against its first
true box) and of ``metrics.GREC_METRICS`` (gRefCOCO's official scorer over every box).
"""

from __future__ import annotations

import fiftyone.operators as foo
import fiftyone.operators.types as types

from ..evaluation.metrics import GREC_METRICS, METRICS


class GroundingMetric(foo.EvaluationMetric):
    """One grounding metric (``KEY`` of ``metrics.METRICS``) of a detection evaluation run: it is
    offered in the App's evaluation form and computed, renamed and deleted with the run."""

    KEY = ""
    LABEL = ""
    LOWER_IS_BETTER = False
    DESCRIPTION = "{label} of each sample's first predicted box against its first true box"

    @property
    def config(self):
        config = foo.EvaluationMetricConfig(
            name=self.KEY, label=self.LABEL, eval_types=["detection"], lower_is_better=self.LOWER_IS_BETTER,
            description=self.DESCRIPTION.format(label=self.LABEL),
            unlisted=True,  # a metric of evaluation runs, not an operation of the operator browser
            risk_level=types.RiskLevel.LOW)  # computes a number from the run's results, writes nothing
        # FiftyOne reads this flag from the config's kwargs when it stores the value
        config.kwargs["lower_is_better"] = self.LOWER_IS_BETTER
        return config

    def compute(self, samples, results, **kwargs):
        from ..evaluation.fiftyone_run import metric_value

        return metric_value(samples, results, self.KEY)


GREC_DESCRIPTION = ("{label}: gRefCOCO's official scorer over every box of phrases of zero, one or several "
                    "objects (boxes kept at confidence >= 0.7)")
METRIC_OPERATORS = tuple(
    type(f"GroundingMetric_{key}", (GroundingMetric,), {"KEY": key, "LABEL": label, "LOWER_IS_BETTER": lower})
    for key, label, lower in METRICS) + tuple(
    type(f"GroundingMetric_{key}", (GroundingMetric,), {"KEY": key, "LABEL": label, "LOWER_IS_BETTER": lower,
                                                        "DESCRIPTION": GREC_DESCRIPTION})
    for key, label, lower in GREC_METRICS)
