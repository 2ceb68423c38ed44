"""The real FiftyOne App in headless Chromium: this plugin's operators, its evaluation in the
Model Evaluation panel, and its grounding panel in the sample modal.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; skipped without it). With
``FOG_SAVE_SCREENSHOTS=1`` the screenshots are also copied into ``docs/`` for the README.
"""

import contextlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

import fiftyone as fo

from fiftyone_grounding.data.fields import GROUNDED_FIELD, PREVIEW_FIELD
from fiftyone_grounding.app.zoo import DEMO_CHECKPOINT_ENV
from fiftyone_grounding.app.registry import OPERATORS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS = Path(__file__).resolve().parents[1] / "docs"
# every operator of the operator browser (the metrics are unlisted: they serve evaluation runs)
OPERATOR_LABELS = tuple(op().config.label for op in OPERATORS if not op().config.unlisted)
TIMEOUT_MS = 60_000

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


README = Path(__file__).resolve().parents[1] / "README.md"
DEMO = "grounding-synthetic-demo"  # the dataset the README's App section opens
# the README's main command, made small: 40 images, one epoch
DEMO_ARGS = "--num-images 40 --epochs 1 --overwrite"


def _readme_python(section: str) -> str:
    """The first Python block of the README's ``## <section>``, as written."""
    text = README.read_text()
    body = text[text.index(f"\n## {section}\n"):]
    return body[body.index("```python\n") + len("```python\n"):body.index("\n```", body.index("```python"))]


def _wait_for_app(port: int, process, seconds: float = 120) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the App's process ended with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the App did not answer on port {port} in {seconds:.0f} s")


@pytest.fixture(scope="module")
def readme_app(tmp_path_factory):
    """The README as a newcomer follows it, from a fresh home (``HOME``: no FiftyOne config, no
    plugins folder, no grounding folder; only the test database is shared): its main command,
    ``make demo`` (made small with ``DEMO_ARGS``), which makes the demo's dataset and checkpoint
    and installs the plugin; then its "In the App" Python block, as written, in a Python process
    of its own (kept open, as a user's shell is). Every browser test of this module uses this App.
    Yields ``(port, the fresh home, demo output folder, what the demo printed)``."""
    import signal
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("home")
    out = tmp_path_factory.mktemp("demo")
    port = _free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("FIFTYONE_PLUGINS_DIR", DEMO_CHECKPOINT_ENV, "FIFTYONE_GROUNDING_HOME", "MAKEFLAGS")}
    env.update(HOME=str(home), FIFTYONE_DATABASE_DIR=fo.config.database_dir, FIFTYONE_DO_NOT_TRACK="true",
               FIFTYONE_DEFAULT_APP_PORT=str(port), FIFTYONE_DEFAULT_APP_ADDRESS="127.0.0.1",
               BROWSER="true")  # launch_app opens a browser tab where it can: here, a command that does nothing
    root = README.parent
    demo = subprocess.run(["make", "-s", "demo", f"DEMO_ARGS={DEMO_ARGS} --out-dir {out} --json {out}/metrics.json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    app = subprocess.Popen([sys.executable, "-c", _readme_python("In the App") + "\nsession.wait(-1)\n"],
                           cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        _wait_for_app(port, app)
        yield port, home, out, demo.stdout + demo.stderr
    finally:
        os.killpg(app.pid, signal.SIGTERM)  # the App's server is its child
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
        if fo.dataset_exists(DEMO):
            fo.delete_dataset(DEMO)


@pytest.fixture(scope="module")
def app_port(readme_app):
    return readme_app[0]


@pytest.fixture
def app(app_port, synthetic_dataset, dataset_name, grounding_plugin_dir):
    """A dataset of 20 synthetic samples of its own and the URL of its page in the App, and the
    plugin in this process too (a test runs its operators from Python). Yields (dataset, URL)."""
    dataset = synthetic_dataset.limit(20).clone(dataset_name)
    yield dataset, f"http://127.0.0.1:{app_port}/datasets/{dataset_name}"


def _save(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("FOG_SAVE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / name)


def _settle_for_picture(page, ms: int) -> None:
    """Wait for the App to finish drawing, only when the screenshots are kept for the docs."""
    if os.environ.get("FOG_SAVE_SCREENSHOTS") == "1":
        page.wait_for_timeout(ms)


def _dismiss_promotions(page) -> None:
    """Close the App's 'Explore Enterprise' card if it shows up, so it hides nothing."""
    dismiss = page.get_by_text("Dismiss", exact=True)
    try:
        dismiss.wait_for(state="visible", timeout=3_000)
        dismiss.click()
    except Exception:  # noqa: BLE001 - the card is optional
        pass


@pytest.fixture(scope="module")
def chromium():
    """One headless Chromium for this module's tests (each gets a page of its own)."""
    from playwright.sync_api import expect, sync_playwright

    # expect() has its own timeout (5 s), apart from the page's: the App server's first operator
    # run imports torch and transformers (compiling them on a fresh install) and loads the model
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def _app_page(browser, url: str):
    """A page of ``browser`` on the App at ``url``, its dataset's sidebar loaded, promotions closed."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url, timeout=TIMEOUT_MS)
        expect(page.locator('[data-cy="sidebar-field-ground_truth"]')).to_be_visible()
        _dismiss_promotions(page)
        yield page
    finally:
        context.close()


def test_the_readme_from_make_demo_to_boxes_in_the_app(readme_app, chromium, tmp_path):
    """After the README's main command and its "In the App" block: the demo's figures are out,
    its output is a log a person can read (captured, not a terminal: lines, no bar redrawn with
    carriage returns), the plugin is installed where FiftyOne looks (the fresh home's plugins folder), the
    operator browser lists the grounding operators, the apply form's defaults (the demo's
    checkpoint, by its absolute path) are valid without typing, and Execute writes boxes."""
    import json

    import torch
    from playwright.sync_api import expect

    port, home, out, printed = readme_app
    assert "\r" not in printed and "[4/4] Evaluating" in printed
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["test"]) >= {"miou", "acc50", "acc75", "auroc", "ece", "acc_at_50_coverage",
                                   "acc_at_80_coverage"}
    assert 0 <= result["test"]["miou"] <= 1 and 0 < result["constant_box_miou"] < 1
    assert result["versions"]["torch"] == torch.__version__.split("+")[0]  # metadata has no local tag
    assert result["machine"]["cpu"] and result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    checkpoint = (out / "run" / "best").resolve()
    assert result["checkpoint"] == str(out / "run" / "best")
    installed = home / "fiftyone" / "__plugins__" / "@fiftyone-grounding" / "grounding"  # FiftyOne's default
    assert f"Installed the App plugin @fiftyone-grounding/grounding: {installed} -> " in printed
    assert installed.is_symlink() and (installed / "fiftyone.yml").is_file()

    dataset = fo.load_dataset(DEMO)
    assert dataset.match_tags("test").count("predictions") == len(dataset.match_tags("test")) > 0
    assert dataset.has_field("predictions_iou")  # the demo's evaluation
    with _app_page(chromium, f"http://127.0.0.1:{port}/datasets/{DEMO}") as page:
        page.keyboard.press("Backquote")  # the operator browser, as the README says
        page.get_by_placeholder("Search operations by name").fill("grounding")
        for label in OPERATOR_LABELS:
            expect(page.get_by_text(label, exact=True)).to_be_visible()
        _save(page, tmp_path, "app_operators.png")

        page.get_by_text("Grounding: apply a model", exact=True).click()
        expect(page.get_by_text("Apply a grounding model", exact=True)).to_be_visible()
        model = page.get_by_text("Model", exact=True).locator("xpath=following::input[1]")
        expect(model).to_have_value(str(checkpoint))  # the demo's checkpoint, by its absolute path
        expect(page.get_by_text("neither a checkpoint folder", exact=False)).to_have_count(0)
        page.get_by_role("button", name="Execute").click()

        expect(page.get_by_text("Samples with a box:", exact=True)).to_be_visible()
        expect(page.get_by_role("dialog").get_by_text(str(len(dataset)), exact=True)).to_be_visible()
        page.get_by_role("button", name="Done").click()
        expect(page.locator('[data-cy="sidebar-field-predictions"]')).to_be_visible()
        _settle_for_picture(page, 3_000)  # let the grid redraw its images
        _save(page, tmp_path, "app_apply_result.png")

    # the demo predicted its test split only; the form's defaults (the field "predictions") all of it
    assert _poll(lambda: dataset.count("predictions.detections") == len(dataset) > dataset.count_values("split")["test"])
    assert dataset.values("predictions.detections.expression") == [[phrase] for phrase in dataset.values("expression")]


def _open_model_evaluation_panel(page, eval_key: str) -> None:
    """The '+' of the grid's tab bar -> Model Evaluation -> the run ``eval_key``."""
    from playwright.sync_api import expect

    page.locator('[title="New panel"], [aria-label="New panel"]').first.click() if page.locator(
        '[title="New panel"], [aria-label="New panel"]').count() else page.get_by_text("+", exact=True).first.click()
    page.get_by_text("Model Evaluation", exact=True).click()
    expect(page.get_by_text(eval_key, exact=True)).to_be_visible()
    for _ in range(5):  # the panel's list takes a click once it has loaded the run's card
        page.get_by_text(eval_key, exact=True).click()
        try:
            page.get_by_text("Summary", exact=True).wait_for(timeout=12_000)
            return
        except Exception:  # noqa: BLE001 - not open yet: click again
            continue
    expect(page.get_by_text("Summary", exact=True)).to_be_visible()


def test_the_model_evaluation_panel_shows_the_grounding_run(app, chromium, tmp_path):
    """A grounding evaluation (run here through the plugin's operator) in the App's Model
    Evaluation panel: one class, the mAP ranked by the confidence, the grounding metrics, and
    the split scenario. The predictions are written here, half of them right (the true box) and
    half wrong (moved off it), each with a confidence, so that every metric has something to show
    whatever a briefly trained model would get right (the apply path has its own browser test)."""
    import fiftyone.operators as foo
    from playwright.sync_api import expect

    from fiftyone_grounding.models.boxes import fiftyone_xywh_to_xyxy
    from fiftyone_grounding.data.labels import make_detections

    dataset, url = app
    ids, phrases, truths = dataset.values(["id", "expression", "ground_truth.detections.bounding_box"])
    labels = {}
    for i, (sid, phrase, boxes) in enumerate(zip(ids, phrases, truths)):
        x0, y0, x1, y1 = fiftyone_xywh_to_xyxy(boxes[0])
        shift = 0.0 if i % 2 else min(1.0 - x1, 0.9 * (x1 - x0)) or -0.9 * x0  # right, or moved off the box
        labels[sid] = make_detections([x0 + shift, y0, x1 + shift, y1], phrase, confidence=0.6 + 0.3 * (i % 2))
    dataset.set_values("predictions", labels, key_field="id")
    foo.execute_operator("@fiftyone-grounding/grounding/evaluate_grounding_model", ctx={"dataset": dataset,
                                                                                          "params": {}})
    with _app_page(chromium, url) as page:
        _open_model_evaluation_panel(page, "eval")
        for label in ("mAP", "mIoU", "Acc@0.5", "confidence AUROC", "confidence ECE"):
            expect(page.get_by_text(label, exact=True).first).to_be_visible()
        page.screenshot(path=str(tmp_path / "app_model_evaluation.png"))  # (docs/ has the demo's run)
        page.get_by_role("tab", name="Scenario Analysis").click()
        # a scenario is there (without one the tab offers to create one): the split field's
        expect(page.get_by_text("Scenario:", exact=True)).to_be_visible()
        expect(page.get_by_text("Prediction Statistics", exact=True)).to_be_visible()


def _modal_sample_id(page, other_than=None) -> str:
    """The id of the sample the modal shows (the page's ``?id=``), once it is not ``other_than``."""
    from urllib.parse import parse_qs, urlparse

    page.wait_for_url(lambda url: parse_qs(urlparse(url).query).get("id", [other_than])[0] != other_than)
    return parse_qs(urlparse(page.url).query)["id"][0]


def _open_grounding_panel(page):
    """The '+' of the modal's tab bar -> Grounding. Returns the panel's content.

    The App opens the modal panels of plugins as tabs of a new modal (then the '+' is gone): that
    tab is closed first, so the panel is opened as a user opens it after closing it."""
    from playwright.sync_api import expect

    modal = page.locator('[data-cy="modal"]')
    tab = modal.locator('[data-cy="panel-tab-grounding_panel"]')
    new_panel = modal.get_by_role("button", name="New panel")
    expect(tab.or_(new_panel).first).to_be_visible()
    if tab.count():
        tab.get_by_role("button", name="Close").click()
        expect(tab).to_have_count(0)
    new_panel.click()
    page.get_by_text("Grounding", exact=True).click()
    panel = modal.locator('[data-cy="panel-content-grounding_panel"]')
    expect(panel.get_by_text("Phrase", exact=True)).to_be_visible()
    return panel


def _poll(read, seconds: float = 30):
    """``read()`` once it is truthy (the App server writes as it answers), or its last value."""
    deadline = time.time() + seconds
    value = read()
    while not value and time.time() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def _boxes(dataset, sample_id: str, field: str) -> list:
    dataset.reload()
    label = dataset[sample_id][field] if dataset.has_field(field) else None
    return label.detections if label is not None else []


def test_the_grounding_panel_grounds_a_typed_phrase_keeps_it_and_follows_the_modal(app, chromium, tmp_path):
    """The first time on a dataset, the panel adds its preview field and asks to reopen the sample
    (the open modal read the fields before). Then, in a sample's modal: the Grounding panel (opened from the tab bar's '+') grounds a typed
    phrase (its line: confidence and IoU with the ground truth; the box in the preview field),
    Keep moves the box into the kept field, and the phrase follows the modal to the next sample
    (whose preview gets a box, the previous preview being cleared)."""
    from playwright.sync_api import expect

    phrase = "the red circle"
    result_line = re.compile(rf"^{re.escape(phrase)} · confidence \d\.\d\d · IoU with ground_truth \d\.\d\d$")
    dataset, url = app
    with _app_page(chromium, url) as page:
        # the first modal on a dataset: the panel adds its preview field and says to reopen the sample
        page.locator('[data-cy="looker"]').first.click()
        modal = page.locator('[data-cy="modal"]')
        expect(_open_grounding_panel(page).get_by_text("close this sample and open it again", exact=False)
               ).to_be_visible()
        dataset.reload()
        assert dataset.has_field(PREVIEW_FIELD)
        page.mouse.click(150, 300)  # the sample's image has the focus: Escape closes the modal
        page.keyboard.press("Escape")
        expect(modal).to_have_count(0)
        page.locator('[data-cy="looker"]').first.click()
        expect(modal).to_be_visible()
        first = _modal_sample_id(page)
        panel = _open_grounding_panel(page)

        # the panel's text box sends its value when typing pauses: fill() is one such pause
        panel.get_by_text("Phrase", exact=True).locator("xpath=following::input[1]").fill(phrase)
        line = panel.locator("p", has=page.locator("strong", has_text=phrase))
        expect(line).to_have_text(result_line)
        # the reopened modal knows the preview field: its sidebar lists it, shown
        expect(modal.locator(f'[data-cy="sidebar-field-{PREVIEW_FIELD}"]')).to_be_visible()
        _settle_for_picture(page, 2_000)  # let the modal redraw the sample
        _save(page, tmp_path, "app_grounding_panel.png")

        preview = _poll(lambda: _boxes(dataset, first, PREVIEW_FIELD))
        assert len(preview) == 1 and preview[0].expression == phrase
        assert preview[0].confidence is not None
        assert f"confidence {preview[0].confidence:.2f}" in line.inner_text()

        panel.get_by_role("button", name="Keep").click()
        expect(panel.get_by_text(f"Kept in {GROUNDED_FIELD}", exact=False)).to_be_visible()
        kept = _poll(lambda: _boxes(dataset, first, GROUNDED_FIELD))
        assert [(d.expression, d.confidence, d.bounding_box) for d in kept] == \
            [(phrase, preview[0].confidence, preview[0].bounding_box)]
        assert _boxes(dataset, first, PREVIEW_FIELD) == []

        # the next sample (the focus is on Keep, not in the text box): the phrase follows
        page.keyboard.press("ArrowRight")
        second = _modal_sample_id(page, other_than=first)
        expect(line).to_have_text(result_line)  # Keep had cleared the line: this is the new sample's
        next_preview = _poll(lambda: _boxes(dataset, second, PREVIEW_FIELD))
        assert [d.expression for d in next_preview] == [phrase] and next_preview[0].confidence is not None

        page.keyboard.press("ArrowRight")  # and on: the previous sample's preview is cleared
        third = _modal_sample_id(page, other_than=second)
        assert [d.expression for d in _poll(lambda: _boxes(dataset, third, PREVIEW_FIELD))] == [phrase]
        assert _poll(lambda: not _boxes(dataset, second, PREVIEW_FIELD))
        assert [d.expression for d in _boxes(dataset, first, GROUNDED_FIELD)] == [phrase]


def _reviewed(dataset, sample_id: str):
    """The review answer the App's server wrote on the sample, None before it has."""
    dataset.reload()
    return dataset[sample_id]["label_error_reviewed"] if dataset.has_field("label_error_reviewed") else None


def test_the_grounding_panel_shows_a_label_error_beside_the_models_box_and_records_the_review(
        app, chromium, tiny_checkpoint):
    """On a sample that Find label errors scored, the panel shows P(wrong), its kind and driver,
    and its two answers write what they say: "Use the model's box" replaces the annotated box
    with the model's (the old one kept on the box) and records "fixed"; "Annotation is right"
    records "ok"; then the panel says how many reviewed flags were wrong annotations."""
    from playwright.sync_api import expect

    from fiftyone_grounding.qa.label_errors import compute_label_errors

    dataset, url = app
    compute_label_errors(dataset, model=tiny_checkpoint, progress=False, say=lambda line: None)
    dataset.select(dataset.values("id")[:2]).tag_samples("suspect")  # two flags to review, whatever they scored
    with _app_page(chromium, url) as page:
        page.locator('[data-cy="looker"]').first.click()
        first = _modal_sample_id(page)
        panel = _open_grounding_panel(page)
        expect(panel.get_by_text("P(wrong)", exact=False)).to_be_visible()
        before = dataset[first].ground_truth.detections[0].bounding_box
        model_box = dataset[first].label_error_box.detections[0].bounding_box
        panel.get_by_role("button", name="Use the model's box").click()
        assert _poll(lambda: _reviewed(dataset, first)) == "fixed"
        fixed = dataset[first].ground_truth.detections[0]
        assert fixed.bounding_box == pytest.approx(model_box)
        assert fixed["previous_bounding_box"] == pytest.approx(before)

        page.keyboard.press("ArrowRight")
        second = _modal_sample_id(page, other_than=first)
        expect(panel.get_by_text("P(wrong)", exact=False)).to_be_visible()
        panel.get_by_role("button", name="Annotation is right").click()
        assert _poll(lambda: _reviewed(dataset, second)) == "ok"
        expect(panel.get_by_text("1 of 2 reviewed flags were wrong annotations (precision 0.50)")).to_be_visible()
