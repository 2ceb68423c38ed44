"""The real FiftyOne App in headless Chromium: this plugin's operators, and its evaluation in the
Model Evaluation panel.

Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; skipped without it). With
``FOG_SAVE_SCREENSHOTS=1`` the screenshots are also copied into ``docs/`` for the README.
"""

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

import fiftyone as fo

from fiftyone_grounding.zoo import DEMO_CHECKPOINT_ENV
from fiftyone_grounding.operators import OPERATORS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS = Path(__file__).resolve().parents[1] / "docs"
# every operator of the operator browser (the metrics are unlisted: they serve evaluation runs)
OPERATOR_LABELS = tuple(op().config.label for op in OPERATORS if not op().config.unlisted)
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(synthetic_dataset, dataset_name, tiny_checkpoint, grounding_plugin_dir, monkeypatch):
    """The App serving 20 synthetic samples on loopback, with this plugin and the tiny checkpoint
    as the default model of the forms. Yields (dataset, URL of its page)."""
    dataset = synthetic_dataset.limit(20).clone(dataset_name)
    monkeypatch.setenv("FIFTYONE_DO_NOT_TRACK", "true")
    monkeypatch.setenv(DEMO_CHECKPOINT_ENV, str(tiny_checkpoint))  # read by the App's server process
    port = _free_port()
    session = fo.launch_app(dataset, remote=True, address="127.0.0.1", port=port)
    try:
        yield dataset, f"http://127.0.0.1:{port}/datasets/{dataset_name}"
    finally:
        session.close()


def _save(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("FOG_SAVE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / name)


def _dismiss_promotions(page) -> None:
    """Close the App's 'Explore Enterprise' card if it shows up, so it hides nothing."""
    dismiss = page.get_by_text("Dismiss", exact=True)
    try:
        dismiss.wait_for(state="visible", timeout=3_000)
        dismiss.click()
    except Exception:  # noqa: BLE001 - the card is optional
        pass


@contextlib.contextmanager
def _app_page(url: str):
    """A Chromium page on the App at ``url``, its dataset's sidebar loaded, promotions closed."""
    from playwright.sync_api import expect, sync_playwright

    # expect() has its own timeout (5 s), apart from the page's: the App server's first operator
    # run imports torch and transformers (compiling them on a fresh install) and loads the model
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url, timeout=TIMEOUT_MS)
            expect(page.locator('[data-cy="sidebar-field-ground_truth"]')).to_be_visible()
            _dismiss_promotions(page)
            yield page
        finally:
            browser.close()


def test_apply_operator_from_the_app_writes_predictions(app, tmp_path):
    from playwright.sync_api import expect

    dataset, url = app
    with _app_page(url) as page:
        page.keyboard.press("Backquote")  # the operator browser
        page.get_by_placeholder("Search operations by name").fill("grounding")
        for label in OPERATOR_LABELS:
            expect(page.get_by_text(label, exact=True)).to_be_visible()
        _save(page, tmp_path, "app_operators.png")

        page.get_by_text("Grounding: apply a model", exact=True).click()
        expect(page.get_by_text("Apply a grounding model", exact=True)).to_be_visible()
        page.get_by_role("button", name="Execute").click()

        expect(page.get_by_text("Samples with a box:", exact=True)).to_be_visible()
        expect(page.get_by_role("dialog").get_by_text("20", exact=True)).to_be_visible()
        page.get_by_role("button", name="Done").click()
        expect(page.locator('[data-cy="sidebar-field-predictions"]')).to_be_visible()
        page.wait_for_timeout(3_000)  # only for the picture: let the grid redraw its images
        _save(page, tmp_path, "app_apply_result.png")

    deadline = time.time() + 30
    while not dataset.has_field("predictions") and time.time() < deadline:
        time.sleep(0.5)
        dataset.reload()
    assert dataset.count("predictions.detections") == len(dataset) == 20
    labels = dataset.values("predictions.detections.label")
    assert labels == dataset.values("ground_truth.detections.label")


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


def test_the_model_evaluation_panel_shows_the_grounding_run(app, tmp_path):
    """A grounding evaluation (run here through the plugin's operator) in the App's Model
    Evaluation panel: one class, the mAP ranked by the confidence, the grounding metrics, and
    the split scenario."""
    import fiftyone.operators as foo
    from playwright.sync_api import expect

    from fiftyone_grounding.apply import apply_grounding_model
    from fiftyone_grounding.fiftyone_model import GroundingModel

    dataset, url = app
    apply_grounding_model(dataset, GroundingModel.from_checkpoint(os.environ[DEMO_CHECKPOINT_ENV], device="cpu"),
                          label_field="predictions")
    foo.execute_operator("@fiftyone-grounding/grounding/evaluate_grounding_model", ctx={"dataset": dataset,
                                                                                          "params": {}})
    with _app_page(url) as page:
        _open_model_evaluation_panel(page, "eval")
        for label in ("mAP", "mIoU", "Acc@0.5", "confidence AUROC", "confidence ECE"):
            expect(page.get_by_text(label, exact=True).first).to_be_visible()
        page.screenshot(path=str(tmp_path / "app_model_evaluation.png"))  # (docs/ has the demo's run)
        page.get_by_role("tab", name="Scenario Analysis").click()
        # a scenario is there (without one the tab offers to create one): the split field's
        expect(page.get_by_text("Scenario:", exact=True)).to_be_visible()
        expect(page.get_by_text("Prediction Statistics", exact=True)).to_be_visible()
