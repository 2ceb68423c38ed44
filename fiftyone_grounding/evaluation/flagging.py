"""How well a score flags wrong annotations: AUROC, average precision, and precision / recall
when a reviewer looks at the top 1%, 5% or 10% of the ranking; overall and per error kind (that
kind against the clean annotations, the other kinds left out)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .confidence import auroc

BUDGETS = (0.01, 0.05, 0.10)  # shares of the samples a reviewer looks at


def average_precision(scores: Sequence[float], positive: Sequence[bool]) -> Optional[float]:
    """Average precision as scikit-learn's ``average_precision_score``: the sum over the distinct
    scores, highest first, of (recall gained there) x (precision there), so that tied samples count
    as one step. None without positives."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if not positive.any():
        return None
    order = np.argsort(-scores, kind="mergesort")
    ordered, hits = scores[order], np.cumsum(positive[order])
    last = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1]  # each tie group's end
    precision = hits[last] / (last + 1)
    recall = hits[last] / hits[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def at_budget(scores: Sequence[float], positive: Sequence[bool], budget: float) -> tuple:
    """(precision, recall) of reviewing the top ``budget`` share of the ranking (at least one
    sample); where the cut falls inside a group of tied scores, the group's share of positives is
    counted for the part of it reviewed (the expected value over orders of the tie)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    k = max(1, int(round(budget * len(scores))))
    cut = np.sort(scores)[::-1][k - 1]
    above, tied = scores > cut, scores == cut
    found = positive[above].sum() + (k - above.sum()) * positive[tied].mean()
    return float(found / k), (float(found / positive.sum()) if positive.any() else None)


def flagging_metrics(scores: Sequence[float], kinds: Sequence[str], budgets: Sequence[float] = BUDGETS) -> dict:
    """``kinds``: each sample's true error kind ("" where its annotation is right). Returns
    ``{"overall": {...}, "<kind>": {...}}``, each with auroc, ap, and precision/recall at each
    budget; the per-kind figures rank that kind among the clean samples only. A sample without a
    score (NaN) ranks last."""
    scores = np.asarray(scores, dtype=np.float64)
    scored = np.isfinite(scores)
    scores = np.where(scored, scores, scores[scored].min() - 1 if scored.any() else 0.0)
    kinds = np.asarray(kinds, dtype=object)
    wrong = kinds != ""
    out = {"overall": _metrics(scores, wrong, budgets)}
    for kind in sorted(set(kinds[wrong])):
        keep = (kinds == kind) | ~wrong
        out[kind] = _metrics(scores[keep], kinds[keep] == kind, budgets)
    return out


def _metrics(scores: np.ndarray, positive: np.ndarray, budgets: Sequence[float]) -> dict:
    row = {"count": int(positive.sum()), "auroc": auroc(scores, positive), "ap": average_precision(scores, positive)}
    for b in budgets:
        row[f"precision@{b:.0%}"], row[f"recall@{b:.0%}"] = at_budget(scores, positive, b)
    return row
