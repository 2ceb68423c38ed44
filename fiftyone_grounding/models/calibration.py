"""The quality head's calibration: the logit it predicts -> the confidence a ``Detection`` carries.

A model with a quality head predicts the IoU of its own box (a logit). ``Calibration`` maps that
logit to the ``confidence`` its ``Detection`` carries: the probability that the box is right,
i.e. overlaps the true box at IoU >= 0.5. It is fitted on the validation split at the end of
training (Platt scaling: ``sigmoid(a * logit + b)``, strictly increasing, so it never ties two
boxes that the head told apart) and kept only where it lowers the calibration error there
(``expected_calibration_error``: the mean gap between confidence and accuracy over 10
equal-width confidence bins, weighted by their share of the samples); otherwise the confidence
is the predicted IoU itself. It is saved with the checkpoint as ``calibration.json``. How far a
confidence can be trusted (AUROC, accuracy at coverage) is measured in ``evaluation/confidence.py``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import CheckpointError

CALIBRATION_NAME = "calibration.json"
CORRECT_IOU = 0.5  # a box is right when its IoU with the truth is at least this
ECE_BINS = 10
CALIBRATION_METHODS = ("identity", "platt")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


@dataclass(frozen=True)
class Calibration:
    """Quality-head logit -> confidence. ``identity``: the predicted IoU (``sigmoid(logit)``);
    ``platt``: ``sigmoid(a * logit + b)``, the probability of IoU >= 0.5 fitted on validation."""

    method: str = "identity"
    a: float = 1.0
    b: float = 0.0
    fitted_on: int = 0  # validation samples it was fitted on
    val_ece: Optional[float] = None  # its expected calibration error there

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in (self.a, self.b)) or self.a <= 0:
            raise CheckpointError(f"Invalid confidence calibration {asdict(self)}: method must be one of "
                                  f"{CALIBRATION_METHODS}, a > 0 and b finite; delete {CALIBRATION_NAME} to use "
                                  "the predicted IoU as the confidence")

    def __call__(self, logits) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        if self.method == "identity":
            return _sigmoid(logits)
        return _sigmoid(self.a * logits + self.b)

    def save(self, folder) -> None:
        path = Path(folder) / CALIBRATION_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder) -> "Calibration":
        """The calibration saved in a checkpoint folder; the identity where there is none."""
        path = Path(folder) / CALIBRATION_NAME
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path} is not a confidence calibration ({e}); delete it to use the "
                                  "predicted IoU as the confidence") from None


def _fit_platt(logits: np.ndarray, correct: np.ndarray, steps: int = 100) -> tuple[float, float]:
    """Logistic regression of ``correct`` on ``logits``: damped Newton steps on the mean
    log-loss (halved until the loss falls), a little ridge towards the identity."""
    x = logits.astype(np.float64)
    y = correct.astype(np.float64)
    ridge = 1e-4

    def loss(a: float, b: float) -> float:
        z = a * x + b
        return float(np.mean(y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z)) + ridge * (a - 1) ** 2)

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(steps):
        p = _sigmoid(a * x + b)
        w = p * (1 - p)
        grad = np.array([np.mean((p - y) * x) + 2 * ridge * (a - 1), np.mean(p - y)])
        hess = np.array([[np.mean(w * x * x) + 2 * ridge, np.mean(w * x)], [np.mean(w * x), np.mean(w) + 1e-12]])
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-6:
            candidate = loss(a - t * step[0], b - t * step[1])
            if candidate <= current:
                break
            t /= 2
        else:
            break
        a, b = a - t * step[0], b - t * step[1]
        improvement, current = current - candidate, candidate
        if improvement < 1e-12:
            break
    return max(float(a), 1e-3), float(b)  # increasing: the confidence keeps the head's order


def fit_calibration(logits: Sequence[float], ious: Sequence[float], groups: Optional[Sequence] = None) -> Calibration:
    """The calibration of a quality head on validation predictions: Platt scaling where it lowers
    the expected calibration error of held-out halves (2-fold), else the identity. ``groups``:
    each prediction's image; the folds split images, not rows, so that the phrases of one image
    (alike, and alike in how right their boxes are) never sit on both sides of the comparison."""
    logits = np.asarray(logits, dtype=np.float64)
    correct = np.asarray(ious, dtype=np.float64) >= CORRECT_IOU
    n = len(logits)
    identity_ece = expected_calibration_error(_sigmoid(logits), correct)
    if n < 20 or correct.all() or not correct.any():  # too few, or nothing to separate
        return Calibration(fitted_on=n, val_ece=identity_ece)
    folds = two_folds(groups if groups is not None else range(n))
    if len(set(folds.tolist())) < 2:
        return Calibration(fitted_on=n, val_ece=identity_ece)
    held_out = []
    for k in (0, 1):
        a, b = _fit_platt(logits[folds != k], correct[folds != k])
        held_out.append(expected_calibration_error(_sigmoid(a * logits[folds == k] + b), correct[folds == k]))
    identity_folds = [expected_calibration_error(_sigmoid(logits[folds == k]), correct[folds == k]) for k in (0, 1)]
    if np.mean(held_out) >= np.mean(identity_folds):
        return Calibration(fitted_on=n, val_ece=identity_ece)
    a, b = _fit_platt(logits, correct)
    fitted_ece = expected_calibration_error(_sigmoid(a * logits + b), correct)
    return Calibration("platt", a, b, fitted_on=n, val_ece=fitted_ece)


def two_folds(groups: Sequence) -> np.ndarray:
    """(n,) 0 or 1 per row: the groups alternate between the folds in the order they first
    appear, every row of a group in its group's fold."""
    fold_of: dict = {}
    for g in groups:
        fold_of.setdefault(g, len(fold_of) % 2)
    return np.asarray([fold_of[g] for g in groups], dtype=np.int64)


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
                               ) -> Optional[float]:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    conf = np.clip(np.asarray(confidences, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return None
    index = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - conf[members].mean())
    return float(total / conf.size)
