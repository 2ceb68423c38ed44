"""Progress a person can read in a log, and the time a run will take: the arithmetic on fixed
times, the line bars on pytest's captured streams (which are not terminals), and the apply path
with FiftyOne and the tiny model. Nothing here is timed."""

import fiftyone as fo
import fiftyone.core.utils as fou
import pytest

from fiftyone_grounding.inference.apply import apply_grounding_model
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.progress import (LineBar, ProgressLines, TimeLeft, bar, estimate_basis, fiftyone_progress,
                                         format_duration, format_rate, progress_line, rate_since)


@pytest.mark.parametrize("seconds, text", [
    (0.2, "1 s"), (1.4, "1 s"), (1.6, "2 s"), (45, "45 s"), (59.4, "59 s"), (59.6, "1 min"), (90, "1.5 min"),
    (594, "9.9 min"), (600, "10 min"), (720, "12 min"), (3540, "59 min"), (3600, "1 h"), (9000, "2.5 h"),
    (108000, "30 h"),
])
def test_durations_read_the_way_a_person_says_them(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("rate, text", [(3.4, "3.4 images/s"), (250, "250 images/s"), (12345.6, "12,346 images/s"),
                                        (0.25, "0.25 images/s"), (9.96, "10 images/s")])
def test_rates(rate, text):
    assert format_rate(rate, "images") == text


def test_the_rate_leaves_out_the_first_batch_once_three_others_measured_it():
    marks = [(0.0, 0), (10.0, 10)]  # the first batch: 10 s of warm-up
    assert estimate_basis(marks) is None
    marks += [(12.0, 20), (14.0, 30)]
    assert estimate_basis(marks) is None  # two batches after the first, 14 s in: not yet
    marks.append((16.0, 40))
    assert estimate_basis(marks) == 1
    assert rate_since(marks, 1) == 5.0 and rate_since(marks, 0) == 2.5
    slow = [(0.0, 0), (30.0, 64), (45.0, 128)]  # slow batches: 20 s in, one after the first is enough
    assert estimate_basis(slow) == 1 and rate_since(slow, 1) == 64 / 15
    assert rate_since([(0.0, 0), (0.0, 5)], 0) is None


def test_time_left_is_told_once_then_again_only_when_it_was_measured_on_few_images():
    left = TimeLeft(1480, unit="images", now=0.0)
    lines = [left.add(10, now=3.0 + 5.0 * i) for i in range(4)]  # 10 images a batch, 5 s each after the first
    assert lines == [None, None, None, "about 12 min left at 2.0 images/s (measured on 3 batches)"]
    assert left.left() == "about 12 min left"
    lines = [left.add(10, now=23.0 + 5.0 * i) for i in range(20)]
    # measured on 30 images: told again once 100 are measured (the 11th batch), then never
    assert [i for i, line in enumerate(lines) if line] == [6]
    assert lines[6] == "about 11 min left at 2.0 images/s (measured on 10 batches)"
    done = TimeLeft(20, now=0.0)
    assert [done.add(5, now=t) for t in (1.0, 2.0, 3.0, 4.0)] == [None] * 4  # the end: nothing left to tell
    assert done.left() == ""


def test_a_line_bar_prints_a_line_every_tenth_and_at_most_every_30_s():
    def lines(seconds_per_step: float, steps: int = 1000):
        printer = ProgressLines("epoch 3/15", steps, start=0.0)
        out = [printer.update(i, i * seconds_per_step, "loss=0.41") for i in range(1, steps + 1)]
        return [line for line in out if line], printer.done(steps, steps * seconds_per_step)

    slow, done = lines(1.0)  # 1,000 s: one line at each 10% up to 80% (the done line says the rest)
    assert [line.split(" (")[0] for line in slow] == [f"epoch 3/15: {p}%" for p in range(10, 90, 10)]
    assert slow[3] == "epoch 3/15: 40% (400/1,000), 6.7 min, about 10 min left, loss=0.41"
    assert done == "epoch 3/15 done: 1,000 in 17 min"
    assert lines(0.02) == ([], "epoch 3/15 done: 1,000 in 20 s")  # 20 s: nothing in between
    assert lines(0.004) == ([], None)  # 4 s: not even the done line
    assert [line.split(" (")[0] for line in lines(0.2)[0]] == [  # 200 s: at most a line each 30 s, each at a 10% step
        f"epoch 3/15: {p}%" for p in (15, 30, 45, 60, 75)]
    # a 31-s epoch: no line at 97% "about 1 s left" (its row in the table follows)
    assert ProgressLines("epoch 1/15", 800, start=0.0).update(778, 30.2) is None
    no_total = ProgressLines("caching", None, start=0.0, unit="batches")
    assert [no_total.update(n, n * 10.0) for n in (1, 2, 3, 4)] == [None, None, "caching: 3 batches, 30 s", None]
    assert progress_line("synthetic images", 120, 300, 12.0) == "synthetic images: 40% (120/300), 12 s, about 18 s left"


def test_tqdm_bars_become_lines_where_stderr_is_not_a_terminal(capsys):
    shown = bar(range(1000), desc="steps")
    assert isinstance(shown, LineBar)
    assert list(shown) == list(range(1000)) and shown.n == 1000
    with bar(desc="updates", total=1000, leave=False) as manual:
        for _ in range(1000):
            manual.update(1)
            manual.set_postfix(loss="0.5", refresh=False)
    assert list(bar(range(5), desc="off", disable=True)) == list(range(5))
    out, err = capsys.readouterr()
    assert "\r" not in out + err and len(err.splitlines()) <= 11


def test_fiftyone_bars_become_lines_and_the_setting_is_restored(capsys):
    before = fo.config.show_progress_bars
    try:
        for setting in (True, False):
            fo.config.show_progress_bars = setting
            with fiftyone_progress(None, "counting") as shown:
                if setting:
                    assert callable(shown) and fo.config.show_progress_bars is False
                else:
                    assert shown is None
                with fou.ProgressBar(total=1000, progress=shown) as pb:
                    for _ in range(1000):
                        pb.update()
            assert fo.config.show_progress_bars is setting
        with fiftyone_progress(False, "off") as shown:
            assert shown is False
    finally:
        fo.config.show_progress_bars = before
    out, err = capsys.readouterr()
    assert "\r" not in out + err and out == ""


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")


def test_the_apply_path_says_what_it_runs_and_how_long_it_takes(synthetic_dataset, dataset_name, model, capsys):
    """20 samples of 10 images, batches of one image: the plan, then the estimate after 4 batches;
    the App's label carries the time left; no bar redrawn in the captured (non-terminal) stdout."""
    view = synthetic_dataset.clone(dataset_name).limit(20)
    assert len(set(view.values("filepath"))) == 10
    labels = []
    apply_grounding_model(view, model, batch_size=2, progress=True,
                          progress_callback=lambda fraction, label: labels.append(label))
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    lines = out.splitlines()
    assert lines[0] == "Grounding 20 phrases in 10 images (tiny, cpu, batch 2)"
    estimates = [line for line in lines if line.startswith("about ")]
    assert len(estimates) == 1 and estimates[0].endswith("images/s (measured on 3 batches)")
    assert labels[:3] == ["2 of 20 samples", "4 of 20 samples", "6 of 20 samples"]
    assert labels[3].startswith("8 of 20 samples, about ") and labels[3].endswith(" left")
    assert labels[-1] == "20 of 20 samples"

    for quiet in (dict(progress=False), dict(progress=None, show_progress_bars=False)):
        before = fo.config.show_progress_bars
        fo.config.show_progress_bars = quiet.pop("show_progress_bars", before)
        try:
            apply_grounding_model(view, model, batch_size=2, label_field="again", **quiet)
        finally:
            fo.config.show_progress_bars = before
        assert capsys.readouterr() == ("", "")
