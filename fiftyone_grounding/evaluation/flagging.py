"""How well a score flags wrong annotations: AUROC, average precision, and precision / recall
when a reviewer looks at the top 1%, 5% or 10% of the ranking; overall and per error kind (that
kind against the clean annotations, the other kinds left out)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .confidence import auroc

BUDGETS = (0.01, 0.05, 0.10)  # shares of the samples a reviewer looks at


def average_precision(scores: Sequence[float], positive: Sequence[bool]) -> Optional[float]:
    """Mean of the precision at each positive's rank, ranked by score (highest first; ties in
    their given order, after a stable sort), as scikit-learn's ``average_precision_score`` without
    ties. None without positives."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if not positive.any():
        return None
    order = np.argsort(-scores, kind="mergesort")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def at_budget(scores: Sequence[float], positive: Sequence[bool], budget: float) -> tuple:
    """(precision, recall) of flagging the top ``budget`` share of the ranking (at least one)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    k = max(1, int(round(budget * len(scores))))
    top = np.argsort(-scores, kind="mergesort")[:k]
    found = int(positive[top].sum())
    return found / k, (found / int(positive.sum()) if positive.any() else None)


def flagging_metrics(scores: Sequence[float], kinds: Sequence[str], budgets: Sequence[float] = BUDGETS) -> dict:
    """``kinds``: each sample's true error kind ("" where its annotation is right). Returns
    ``{"overall": {...}, "<kind>": {...}}``, each with auroc, ap, and precision/recall at each
    budget; the per-kind figures rank that kind among the clean samples only."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    kinds = np.asarray(kinds, dtype=object)
    wrong = kinds != ""
    out = {"overall": _metrics(scores, wrong, budgets)}
    for kind in sorted(set(kinds[wrong])):
        keep = (kinds == kind) | ~wrong
        out[kind] = _metrics(scores[keep], kinds[keep] == kind, budgets)
    return out


def _metrics(scores: np.ndarray, positive: np.ndarray, budgets: Sequence[float]) -> dict:
    finite = np.where(np.isfinite(scores), scores, np.nanmin(np.where(np.isfinite(scores), scores, np.nan)) - 1
                      if np.isfinite(scores).any() else 0.0)
    row = {"count": int(positive.sum()), "auroc": auroc(finite, positive), "ap": average_precision(finite, positive)}
    for b in budgets:
        row[f"precision@{b:.0%}"], row[f"recall@{b:.0%}"] = at_budget(finite, positive, b)
    return row
