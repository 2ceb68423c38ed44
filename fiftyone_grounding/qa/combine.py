"""The label-error score: the signals of ``signals.py`` combined into one probability.

Errors are injected into a copy of the scored annotations (``inject.py``): each copy is a known
error of a known kind, while the annotations themselves are a mix of right ones and an unknown
share of wrong ones (learning from positive and unlabelled examples). So:

- a small classifier (an MLP: two hidden layers of 64, weight decay; the signals' evidence is not
  linear: a box far from the model's means more when the model is sure of its own) tells the
  annotations from the copies of each kind; ``g(x)``, one minus its probability of "annotation",
  ranks the samples, and its most likely kind is the sample's kind;
- every sample is scored by a classifier that was not fitted on it (two-fold cross-fitting: the
  rows are split in two halves, each half scored by the classifier of the other; a sample outside
  the fitted rows by the mean of both): fitted on a real error as "annotation", a classifier would
  learn to excuse it;
- the view's error rate ``pi`` is the mixture proportion of the copies' ``g`` distribution in the
  annotations' (Blanchard, Lee & Scott 2010; Scott 2015: the smallest ratio of the two tails,
  ``min_t P(g > t | annotation) / P(g > t | copy)``, over tails that hold enough copies);
- ``P(wrong | x) = sigmoid(logit g(x) + delta)``, with ``delta`` such that the mean of ``P(wrong)``
  over the annotations is ``pi`` (calibrated in the large; a monotone map, so the ranking is
  ``g``'s, with no ties at 1).

This holds when the injected errors look like the real ones (the kinds injected are those Ref-L4
found in RefCOCO); ``pi`` is then an upper bound of the true rate that is tight where some errors
look like no right annotation.

Each sample also reports the part (disagreement, the annotated box's own score, ambiguity,
absence) that drives its score: the one whose features, set to an average annotation's, lower
its log-odds of being wrong the most.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .signals import Signals

# Which part of what the model knows each feature belongs to (the "driver" a sample reports).
PARTS = {
    "disagreement": ("disagreement", "miss", "miss_squared", "confidence", "area_ratio", "offset",
                     "offset_x_confidence"),
    "given_box": ("given", "given_squared", "given_x_confidence", "given_over_confidence", "miss_x_doubt"),
    "ambiguity": ("ambiguity",),
    "absence": ("exists", "exists_x_given"),
}
FEATURES = tuple(f for features in PARTS.values() for f in features)
# What a user fixes for each injected kind: a swapped phrase is a box on another object than the
# phrase names, as a moved box is.
REPORTED_KIND = {"wrong_object": "wrong_object", "swapped_phrase": "wrong_object", "bad_box": "bad_box",
                 "no_target": "no_target"}
AMBIGUOUS = "ambiguous"  # reported where ambiguity drives a multi-box model's score


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def features(signals: Signals) -> dict[str, np.ndarray]:
    """The classifier's inputs: each signal on a scale where a linear model can use it, and the
    products and squares through which one signal changes what another means (a box far from the
    model's says more when the model is sure; the annotated box's score, against the model's own)."""
    conf, iou, given, exists = signals["confidence"], signals["iou"], signals["given"], signals["exists"]
    sure = np.nan_to_num(conf, nan=1.0)
    offset = np.log1p(signals["offset"])
    return {
        "disagreement": sure * (1 - iou),
        "miss": 1 - iou,
        "miss_squared": (1 - iou) ** 2,
        "confidence": _logit(conf),
        "area_ratio": signals["area_ratio"],
        "offset": offset,
        "offset_x_confidence": offset * sure,
        "given": _logit(given),
        "given_squared": _logit(given) ** 2,
        "given_x_confidence": given * sure,
        "given_over_confidence": _logit(given) - _logit(conf),
        "miss_x_doubt": (1 - iou) * (1 - given),
        "ambiguity": _logit(signals["ambiguity"]),
        "exists": _logit(exists),
        "exists_x_given": exists * given,
    }


@dataclass
class ErrorModel:
    """A fitted label-error score: standardized features -> class probabilities -> P(wrong)."""

    columns: list  # the features it uses (those the model could give)
    mean: np.ndarray
    std: np.ndarray
    classes: list  # "" (an annotation), then the injected kinds
    halves: list  # the two MLPs, each [(W (in, out), b (out,)), ...] with ReLU between, fitted on one half
    error_rate: float  # pi: the annotations' estimated share of errors
    shift: float  # delta
    typical: np.ndarray  # (F,) an average annotation's standardized features (the drivers' reference)
    fitted_on: dict = field(default_factory=dict)  # "annotations", and each kind -> count
    fitted_half: Optional[np.ndarray] = None  # the half each row it was fitted on fell in

    def _x(self, signals: Signals) -> np.ndarray:
        f = features(signals)
        x = np.stack([f[c] for c in self.columns], axis=1)
        x = np.where(np.isnan(x), self.mean, x)  # a signal missing here (an unreadable box): the average
        return (x - self.mean) / self.std

    def logits(self, signals: Signals, half: Optional[np.ndarray] = None) -> np.ndarray:
        """(N, C) class logits, each sample's from the half's MLP that was not fitted on it
        (``half``: the half a sample was fitted in, -1 or None: in neither; then the mean of both)."""
        x = self._x(signals)
        both = [_forward(layers, x) for layers in self.halves]
        out = (both[0] + both[1]) / 2
        if half is not None:
            half = np.asarray(half)
            for h in (0, 1):  # the MLP of half 1 - h was fitted on half 1 - h: it never saw half h
                out[half == h] = both[1 - h][half == h]
        return out

    def probability(self, signals: Signals, half: Optional[np.ndarray] = None) -> np.ndarray:
        """(N,) P(the annotation is wrong)."""
        return _sigmoid(_error_logit(self.logits(signals, half)) + self.shift)

    def kind(self, signals: Signals, half: Optional[np.ndarray] = None) -> list[str]:
        """Each sample's most likely kind, were its annotation wrong."""
        return [self.classes[1 + i] for i in self.logits(signals, half)[:, 1:].argmax(1)]

    def drivers(self, signals: Signals) -> list[str]:
        """Per sample, the part whose features, set to an average annotation's, lower its
        log-odds of being wrong the most (with the mean of both MLPs)."""
        x = self._x(signals)

        def error_logit(inputs):
            return _error_logit(sum(_forward(layers, inputs) for layers in self.halves) / 2)

        full = error_logit(x)
        parts = [p for p in PARTS if any(c in self.columns for c in PARTS[p])]
        drops = []
        for part in parts:
            cols = [self.columns.index(c) for c in PARTS[part] if c in self.columns]
            ablated = x.copy()
            ablated[:, cols] = self.typical[cols]
            drops.append(full - error_logit(ablated))
        return [parts[i] for i in np.stack(drops, axis=1).argmax(1)]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _error_logit(logits: np.ndarray) -> np.ndarray:
    """logit g: log P(any kind) - log P(annotation), from (N, C) class logits (class 0: annotation)."""
    rest = logits[:, 1:]
    top = rest.max(1)
    return top + np.log(np.exp(rest - top[:, None]).sum(1)) - logits[:, 0]


def _forward(layers: list, x: np.ndarray) -> np.ndarray:
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def mixture_proportion(g_mixed: np.ndarray, g_component: np.ndarray, min_tail: int = 20) -> float:
    """The largest share of the ``g_component`` distribution that the ``g_mixed`` one can hold
    (Blanchard, Lee & Scott 2010): the smallest ratio of their tails ``P(g > t)``, over the
    thresholds ``t`` above which at least ``min_tail`` (and 5%) of ``g_component`` lie."""
    g_mixed, g_component = np.asarray(g_mixed, dtype=np.float64), np.asarray(g_component, dtype=np.float64)
    need = max(min_tail, int(0.05 * len(g_component)))
    ordered = np.sort(g_component)[::-1]
    best = 1.0
    for t in ordered[need - 1:] if len(ordered) >= need else ordered[-1:]:
        tail = (g_component >= t).mean()
        best = min(best, float((g_mixed >= t).mean() / tail))
    return best


def _shift_to_mean(logit_g: np.ndarray, target: float) -> float:
    """``delta`` with mean(sigmoid(logit_g + delta)) == target (bisection: the mean rises with delta)."""
    lo, hi = -40.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _sigmoid(logit_g + mid).mean() > target:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


HIDDEN, WEIGHT_DECAY, STEPS, LR = 64, 3e-3, 1000, 3e-3  # the classifier (chosen on the synthetic benchmark)


def _fit_mlp(x: np.ndarray, y: np.ndarray, classes: int, seed: int = 0) -> list:
    """An MLP (two hidden layers of ``HIDDEN``, ReLU) fitted by full-batch Adam on the cross-entropy
    with an L2 penalty on the weights; returns its layers as numpy arrays."""
    generator = torch.Generator().manual_seed(seed)
    dims = [x.shape[1], HIDDEN, HIDDEN, classes]
    weights = [torch.nn.Parameter(torch.randn(a, b, generator=generator) * (2 / a) ** 0.5)
               for a, b in zip(dims, dims[1:])]
    biases = [torch.nn.Parameter(torch.zeros(b)) for b in dims[1:]]
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    optimizer = torch.optim.Adam(weights + biases, lr=LR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (8,000 x 64) products: threads cost more than they save (41 s against 3 s on 2 cores)
    try:
        _adam_steps(weights, biases, xt, yt, optimizer)
    finally:
        torch.set_num_threads(threads)
    return [(w.detach().double().numpy(), b.detach().double().numpy()) for w, b in zip(weights, biases)]


def _adam_steps(weights: list, biases: list, xt, yt, optimizer) -> None:
    for _ in range(STEPS):
        h = xt
        for i, (w, b) in enumerate(zip(weights, biases)):
            h = h @ w + b
            if i < len(weights) - 1:
                h = torch.relu(h)
        loss = torch.nn.functional.cross_entropy(h, yt) + WEIGHT_DECAY * sum((w ** 2).sum() for w in weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fit_error_model(signals: Signals, labels: Sequence[str], kinds: Sequence[str], seed: int = 0) -> ErrorModel:
    """The score of ``signals`` (annotations and injected copies) from ``labels`` ("" for an
    annotation, else the copy's injected kind). Features the model never gave (all NaN) are left
    out."""
    f = features(signals)
    columns = [c for c in FEATURES if not np.all(np.isnan(f[c]))]
    labels = np.asarray(labels, dtype=object)
    classes = [""] + [k for k in kinds if (labels == k).any()]
    y = np.asarray([classes.index(label) for label in labels])
    x = np.stack([f[c] for c in columns], axis=1)
    mean = np.nanmean(x, axis=0)
    std = np.nanstd(x, axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    x = (np.where(np.isnan(x), mean, x) - mean) / std
    # each half's MLP; every fitted row's g from the MLP of the other half
    half = np.random.default_rng([seed, 28]).permutation(len(x)) % 2
    halves = [_fit_mlp(x[half == h], y[half == h], len(classes), seed) for h in (0, 1)]
    held_out = np.empty(len(x))
    for h in (0, 1):
        held_out[half == h] = _error_logit(_forward(halves[1 - h], x[half == h]))
    rate = mixture_proportion(_sigmoid(held_out[y == 0]), _sigmoid(held_out[y > 0]))
    shift = _shift_to_mean(held_out[y == 0], rate)
    fitted_on = {"annotations": int((y == 0).sum()), **{k: int((labels == k).sum()) for k in classes[1:]}}
    return ErrorModel(columns, mean, std, classes, halves, rate, shift, x[y == 0].mean(0), fitted_on, half)
