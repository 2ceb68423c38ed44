"""Samples left out of training or inference, and why: each counted once, tallied by reason."""

from __future__ import annotations

from typing import Iterable, Sequence


def once_each(skipped: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each ``(sample id, reason)`` once, in the order first seen (training reads an unreadable
    image again every epoch)."""
    return list(dict.fromkeys(skipped))


def count_by_reason(skipped: Sequence[tuple[str, str]]) -> str:
    """``"3 x <reason>, 1 x <reason>"``: how many samples each reason left out, reasons in the
    order first seen."""
    reasons: dict[str, int] = {}
    for _, why in skipped:
        reasons[why] = reasons.get(why, 0) + 1
    return ", ".join(f"{n} x {r}" for r, n in reasons.items())
