"""The runner that streams an operator's progress to the App (``app/streaming.py``), driven directly."""

import contextvars
import threading

import pytest

from fiftyone_grounding.app.streaming import THREAD_NAME, run_in_thread
from fiftyone_grounding.errors import InputError

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def _runner_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_progress_comes_in_order_then_the_result_and_the_thread_has_ended():
    """Each report reaches the caller, in order, while the work runs (the work waits until the
    caller has seen it), then the work's result; the thread is gone when the generator returns."""
    seen = threading.Event()
    workers = []

    def work(progress):
        workers.append(threading.current_thread())
        for fraction in FRACTIONS:
            seen.clear()
            progress(fraction, f"{fraction:.0%}")
            assert seen.wait(10), "the caller never received the report"
        return {"answer": 42}

    events = []
    for kind, value in run_in_thread(work):
        events.append((kind, value))
        if kind == "progress":
            seen.set()
    assert events == [("progress", (f, f"{f:.0%}")) for f in FRACTIONS] + [("done", {"answer": 42})]
    assert workers[0] is not threading.current_thread() and workers[0].name == THREAD_NAME
    assert not workers[0].is_alive() and not _runner_threads()


def test_reports_that_pile_up_reach_the_caller_newest_first_in_order():
    """Reports sent faster than the caller reads them: it gets the newest of those waiting, so
    what it sees is in order and ends with the result."""
    def work(progress):
        for i in range(200):
            progress(i / 200, str(i))
        return "finished"

    events = list(run_in_thread(work))
    fractions = [value[0] for kind, value in events if kind == "progress"]
    assert fractions == sorted(set(fractions)) and set(fractions) <= {i / 200 for i in range(200)}
    assert events[-1] == ("done", "finished") and [kind for kind, _ in events].count("done") == 1
    assert not _runner_threads()


def test_an_error_of_the_work_is_raised_to_the_caller_after_its_progress():
    def work(progress):
        progress(0.5, "half way")
        raise InputError("the phrase is empty")

    received = []
    with pytest.raises(InputError, match="the phrase is empty"):
        for event in run_in_thread(work):
            received.append(event)
    assert received in ([], [("progress", (0.5, "half way"))])  # the report may be dropped for the newer error
    assert not _runner_threads()


def test_an_interrupt_in_the_work_reaches_the_caller_too():
    def work(progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(run_in_thread(work))
    assert not _runner_threads()


def test_the_work_sees_the_callers_context_variables():
    """The thread runs in a copy of the caller's context (FiftyOne keeps request state there)."""
    variable = contextvars.ContextVar("variable", default="unset")
    token = variable.set("the caller's")
    try:
        assert list(run_in_thread(lambda progress: variable.get())) == [("done", "the caller's")]
    finally:
        variable.reset(token)
