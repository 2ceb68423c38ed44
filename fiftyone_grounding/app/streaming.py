"""Streaming an operator's progress to the App while its work runs.

An immediate run of an operator is a generator of App messages (``execute_as_generator``):
:func:`run_in_thread` runs the work in a thread and hands its progress reports to that
generator through a queue, so that ``set_progress`` messages go out while the work goes on.
:func:`shown_results` gives a Python caller of such an operator the results the App was shown.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from typing import Callable, Iterator, Optional

THREAD_NAME = "fiftyone-grounding-operator"

Progress = Callable[[float, str], None]  # progress(fraction, label)


def run_in_thread(work: Callable[[Progress], dict]) -> Iterator[tuple[str, object]]:
    """Run ``work(progress_callback)`` in a thread; yields ``("progress", (fraction, label))``
    (only the newest of those waiting) and at the end ``("done", result)``; raises its error.

    The thread runs in a copy of the caller's context (its ``contextvars``), and has ended
    when the generator returns or raises."""
    events: queue.Queue = queue.Queue()

    def target() -> None:
        try:
            events.put(("done", work(lambda fraction, label: events.put(("progress", (fraction, label))))))
        except BaseException as e:  # noqa: BLE001 - handed to the generator, which raises it
            events.put(("error", e))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True,
                              name=THREAD_NAME)
    thread.start()
    while True:
        kind, value = events.get()
        while kind == "progress" and not events.empty():  # the App needs the newest only
            kind, value = events.get_nowait()
        if kind == "error":
            thread.join()
            raise value
        yield kind, value
        if kind == "done":
            thread.join()
            return


def shown_results(execution) -> Optional[dict]:
    """The results an immediate run showed in the App (its last ``show_output``): what a
    Python caller of a streaming operator gets instead of FiftyOne's ``None``."""
    requests = execution.executor.to_json()["requests"] if execution.executor is not None else []
    shown = [r["params"]["results"] for r in requests if r["operator_uri"] == "show_output"]
    return shown[-1] if shown else None
