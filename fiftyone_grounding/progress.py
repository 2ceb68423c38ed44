"""Progress a person can read, on a terminal and in a log file, and the time a run will take.

- :func:`bar`: tqdm's bar on a terminal or in a notebook; elsewhere (a log, a pipe) a
  :class:`LineBar` that prints a plain line every ``LINE_STEP`` of the work, at most one every
  ``LINE_SECONDS``, so ``make demo > demo.log`` holds lines, not thousands of redrawn bars.
- :func:`fiftyone_progress`: the same for FiftyOne's bars (``progress=`` of ``add_samples``,
  ``set_values``, ``apply_model``, ``fou.ProgressBar``), which draw on stdout.
- :class:`TimeLeft`: the expected duration of a loop of batches, measured on its first
  batches (the first one, which pays the warm-up, left out); the apply path prints it once
  and puts it in the App's progress label.

The arithmetic (:func:`format_duration`, :func:`format_rate`, :func:`rate_since`,
:func:`estimate_basis`, :class:`ProgressLines`) takes its times as arguments: pure, and
tested on fixed inputs.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, Optional, Sequence

LINE_STEP = 0.1  # a line at each 10% of the work...
LINE_SECONDS = 30.0  # ...but not more often than this (a 20-s stage prints no line in between)
DONE_LINE_AFTER = 5.0  # stages that took longer end with a "done" line (leave=True)
ESTIMATE_BATCHES = 3  # batches measured, the first left out, before the time left is told
ESTIMATE_SECONDS = 20.0  # or this long into a run of slow batches (two done, the first left out)
FEW_MEASURED = 100  # an estimate made on fewer units is told again once this many are measured


# -- pure arithmetic -------------------------------------------------------------------------------


def _short(x: float) -> str:
    """One decimal below 10 (without a trailing ``.0``), whole numbers above."""
    return f"{x:.1f}".removesuffix(".0") if x < 9.95 else f"{x:,.0f}"


def format_duration(seconds: float) -> str:
    """A duration the way a person says it: ``"1 s"`` (the least), ``"45 s"``, ``"1.5 min"``,
    ``"12 min"``, ``"2.5 h"``, ``"30 h"``."""
    if seconds < 1.5:
        return "1 s"
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    if seconds < 59.5 * 60:
        return f"{_short(seconds / 60)} min"
    return f"{_short(seconds / 3600)} h"


def format_rate(per_second: float, unit: str) -> str:
    """``"3.4 images/s"``, ``"250 images/s"``, ``"0.25 images/s"``."""
    if per_second >= 9.95:
        return f"{per_second:,.0f} {unit}/s"
    if per_second >= 0.995:
        return f"{per_second:.1f} {unit}/s"
    return f"{per_second:.2f} {unit}/s"


def rate_since(marks: Sequence[tuple[float, int]], start: int) -> Optional[float]:
    """Units per second between ``marks[start]`` and the last mark; ``marks`` are ``(time,
    units done so far)``, the first one the start ``(t0, 0)``. None without time or units between."""
    (t0, n0), (t1, n1) = marks[start], marks[-1]
    if t1 <= t0 or n1 <= n0:
        return None
    return (n1 - n0) / (t1 - t0)


def estimate_basis(marks: Sequence[tuple[float, int]], min_batches: int = ESTIMATE_BATCHES,
                   min_seconds: float = ESTIMATE_SECONDS) -> Optional[int]:
    """The mark to measure the rate from, once an estimate can be made (else None): the end of
    the first batch (which pays the warm-up: model, threads, caches), once ``min_batches``
    batches followed it, or once ``min_seconds`` passed with one batch after it."""
    batches = len(marks) - 1
    if batches >= min_batches + 1 or (batches >= 2 and marks[-1][0] - marks[0][0] >= min_seconds):
        return 1
    return None


def progress_line(desc: str, done: int, total: Optional[int], elapsed: float, postfix: str = "",
                  unit: str = "it") -> str:
    """``"epoch 3/15: 40% (120/300), 12 s, about 18 s left"`` (without a total: ``"desc: 120
    it, 12 s"``), then the postfix (``"loss=0.41, iou=0.52"``)."""
    if total:
        line = f"{desc}: {done / total:.0%} ({done:,}/{total:,}), {format_duration(elapsed)}"
        if 0 < done < total:
            line += f", about {format_duration(elapsed / done * (total - done))} left"
    else:
        line = f"{desc}: {done:,} {unit}, {format_duration(elapsed)}"
    return f"{line}, {postfix}" if postfix else line


class ProgressLines:
    """When a line-printing bar prints: at each ``step`` of the work (each ``LINE_STEP``) but the
    last (the stage's end follows: its done line, or an epoch's row), and at least ``seconds``
    after the start or the previous line; without a total, every ``seconds``. The times are
    given, so it runs the same in a test."""

    def __init__(self, desc: str, total: Optional[int], start: float, unit: str = "it",
                 step: float = LINE_STEP, seconds: float = LINE_SECONDS):
        self.desc, self.total, self.start, self.unit = desc, total, start, unit
        self.steps, self.seconds = round(1 / step), seconds  # steps in the whole work
        self.last_line = start
        self.next_step = 1  # the next line waits for this many steps of the work

    def update(self, done: int, now: float, postfix: str = "") -> Optional[str]:
        """The line to print for ``done`` units at time ``now``, or None."""
        if now - self.last_line < self.seconds:
            return None
        if self.total:  # whole numbers: 300 of 1,000 is 3 steps of 10%, exactly
            if done * self.steps < self.next_step * self.total:
                return None
            if done * self.steps >= (self.steps - 1) * self.total:  # the last step: its end says the rest
                return None
            self.next_step = done * self.steps // self.total + 1
        self.last_line = now
        return progress_line(self.desc, done, self.total, now - self.start, postfix, self.unit)

    def done(self, done: int, now: float, after: float = DONE_LINE_AFTER) -> Optional[str]:
        """``"synthetic images done: 16,000 in 31 s"`` for a stage that took ``after`` or longer."""
        if now - self.start < after:
            return None
        return f"{self.desc} done: {done:,} in {format_duration(now - self.start)}"


# -- where bars can redraw ----------------------------------------------------------------------


def interactive(stream) -> bool:
    """Whether a bar can redraw itself on ``stream``: a terminal, or a notebook (tqdm and
    FiftyOne draw widgets or HTML there)."""
    from fiftyone.core.context import is_notebook_context

    if is_notebook_context():
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _print(line: str, stream_name: str) -> None:
    stream = getattr(sys, stream_name)  # looked up at each line: pytest and the App replace it
    print(line, file=stream, flush=True)


# -- tqdm's bars ----------------------------------------------------------------------------------


class LineBar:
    """The part of tqdm's API the package uses (iteration, ``update``, ``set_postfix``,
    ``close``, ``with``), printing :class:`ProgressLines` to stderr (where tqdm draws)."""

    def __init__(self, iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None,
                 disable: bool = False, leave: bool = True, unit: str = "it"):
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.iterable, self.total, self.disable, self.leave = iterable, total, disable, leave
        self.n = 0
        self.postfix = ""
        self._closed = False
        self._lines = ProgressLines(desc, total, time.monotonic(), unit)

    def __iter__(self) -> Iterator:
        if self.disable:
            yield from self.iterable
            return
        finished = False
        try:
            for item in self.iterable:
                yield item
                self.update(1)
            finished = True
        finally:
            self.close(finished)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.disable:
            line = self._lines.update(self.n, time.monotonic(), self.postfix)
            if line is not None:
                _print(line, "stderr")

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self, finished: bool = True) -> None:
        """The "done" line (``leave=True``, a long stage that ended normally)."""
        if self._closed:
            return
        self._closed = True
        if finished and self.leave and not self.disable:
            line = self._lines.done(self.n, time.monotonic())
            if line is not None:
                _print(line, "stderr")

    def __enter__(self) -> "LineBar":
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        self.close(exc_type is None)
        return False


def bar(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, disable: bool = False,
        leave: bool = True, unit: str = "it"):
    """tqdm's bar on a terminal or in a notebook, a :class:`LineBar` elsewhere."""
    if disable or not interactive(sys.stderr):
        return LineBar(iterable, desc=desc, total=total, disable=disable, leave=leave, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, unit=unit, dynamic_ncols=True)


# -- FiftyOne's bars -----------------------------------------------------------------------------


def shows_progress(progress) -> bool:
    """Whether FiftyOne's ``progress=`` shows anything: True or a callback; None follows
    ``fo.config.show_progress_bars``."""
    if progress is None:
        import fiftyone as fo

        return bool(fo.config.show_progress_bars)
    return progress is not False


class FiftyOneLines:
    """A FiftyOne progress callback (``progress=`` of its bars) printing :class:`ProgressLines`
    to stdout, where FiftyOne draws; each new bar (a new ``ProgressBar``) starts over, and the
    previous one gets its "done" line."""

    def __init__(self, desc: str):
        self.desc = desc
        self._bar = None  # the FiftyOne ProgressBar being followed
        self._lines: Optional[ProgressLines] = None

    def __call__(self, pb) -> None:
        now = time.monotonic()
        if pb is not self._bar:
            self.finish(now)
            self._bar = pb
            self._lines = ProgressLines(self.desc, pb.total, now - (pb.elapsed_time or 0.0),
                                        getattr(pb, "_iters_str", "it"))
        line = self._lines.update(pb.iteration, now)
        if line is not None:
            _print(line, "stdout")

    def finish(self, now: Optional[float] = None) -> None:
        """The "done" line of the bar followed so far, if it completed and took a while."""
        pb, self._bar = self._bar, None
        if pb is not None and (pb.total is None or pb.iteration >= pb.total):
            line = self._lines.done(pb.iteration, time.monotonic() if now is None else now)
            if line is not None:
                _print(line, "stdout")


@contextlib.contextmanager
def fiftyone_progress(progress, desc: str):
    """The value to pass as FiftyOne's ``progress=`` inside the block: ``progress`` itself on a
    terminal, in a notebook, or where it is False, None with bars off, or a callback; elsewhere a
    :class:`FiftyOneLines` printer, with ``fo.config.show_progress_bars`` off inside the block
    (FiftyOne still draws its bar beside a callback while it is on) and restored after it.

        with fiftyone_progress(progress, "applying the model") as shown:
            view.apply_model(model, ..., progress=shown)
    """
    if not shows_progress(progress) or callable(progress) or interactive(sys.stdout):
        yield progress
        return
    import fiftyone as fo

    printer = FiftyOneLines(desc)
    previous = fo.config.show_progress_bars
    fo.config.show_progress_bars = False
    try:
        yield printer
        printer.finish()
    finally:
        fo.config.show_progress_bars = previous


# -- the time a run will take ----------------------------------------------------------------------


class TimeLeft:
    """The expected duration of a loop over ``total`` units (images) in batches.

    Call :meth:`add` after each batch with the units it finished; it returns the line to print
    (``"about 12 min left at 3.4 images/s (measured on 3 batches)"``) once the first batches have
    measured the rate (:func:`estimate_basis`: the first batch left out), and a second time only
    if that one was measured on fewer than ``FEW_MEASURED`` units. :meth:`left` (``"about 2 min
    left"``) follows every batch, for a progress label. ``now``: a time.monotonic() reading
    (default: now)."""

    def __init__(self, total: int, unit: str = "images", now: Optional[float] = None):
        self.total, self.unit = total, unit
        self.marks: list[tuple[float, int]] = [(time.monotonic() if now is None else now, 0)]
        self._told_on: Optional[int] = None  # the units the last printed estimate was measured on

    @property
    def done(self) -> int:
        return self.marks[-1][1]

    def _measure(self) -> Optional[tuple[float, int, int]]:
        """(rate, units measured, batches measured), or None before the rate is known."""
        start = estimate_basis(self.marks)
        if start is None:
            return None
        rate = rate_since(self.marks, start)
        if rate is None:
            return None
        return rate, self.done - self.marks[start][1], len(self.marks) - 1 - start

    def seconds_left(self) -> Optional[float]:
        measured = self._measure()
        return None if measured is None else max(0, self.total - self.done) / measured[0]

    def left(self) -> str:
        """``"about 2 min left"``, or ``""`` before the rate is known or after the end."""
        seconds = self.seconds_left()
        return f"about {format_duration(seconds)} left" if seconds and self.done < self.total else ""

    def add(self, count: int, now: Optional[float] = None) -> Optional[str]:
        """Count ``count`` more units done at ``now``; the estimate line when one is due."""
        self.marks.append((time.monotonic() if now is None else now, self.done + count))
        measured = self._measure()
        if measured is None or self.done >= self.total:
            return None
        rate, units, batches = measured
        if self._told_on is not None and (self._told_on >= FEW_MEASURED or units < FEW_MEASURED):
            return None
        self._told_on = units
        return (f"about {format_duration((self.total - self.done) / rate)} left at {format_rate(rate, self.unit)} "
                f"(measured on {batches:,} batch{'es' if batches != 1 else ''})")
