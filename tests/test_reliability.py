"""Bad input, interruptions and untrusted files: no lost work, no code run (issue 6).

Real FiftyOne, real files, real processes killed with SIGKILL. The README's reliability section is the
table of what each bad input gets.
"""

import io
import json
import logging
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone.operators.executor import ExecutionError

from fiftyone_grounding.inference.apply import apply_grounding_model
from fiftyone_grounding.models.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, atomic_write_dir, convert_checkpoint,
                                           load_checkpoint, resolve_checkpoint_dir)
from fiftyone_grounding.cli import main as cli_main
from fiftyone_grounding.models.config import GrounderConfig, get_config
from fiftyone_grounding.data.records import read_records
from fiftyone_grounding.data.datasets import GroundingDataset
from fiftyone_grounding.models.encoders import load_encoder, tiny_encoder_dir
from fiftyone_grounding.errors import CheckpointError, EncoderUnavailableError, TrainingError
from fiftyone_grounding.evaluation.fiftyone_run import evaluate_in_fiftyone
from fiftyone_grounding.evaluation.scoring import evaluate_grounding
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.data.images import MAX_IMAGE_PIXELS, load_rgb
from fiftyone_grounding.data.labels import MAX_EXPRESSION_CHARS
from fiftyone_grounding.app.streaming import shown_results
from fiftyone_grounding.inference.predict import predict_and_crop
from fiftyone_grounding.engine.fit import fit
from fiftyone_grounding.app.zoo import (DEMO_CHECKPOINT_ENV, download_model, load_grounding_model, load_model,
                                           register_local_source, validate_manifest)

REPO = Path(__file__).resolve().parents[1]
DEMO = "fiftyone-grounding/tiny-synthetic-demo"
CUT_WARNING = "longer than the text encoder's limit"
LONG_PHRASE = ("the small red circle on the left " * 400)[:10_000]
TINY_FIT = dict(preset="tiny", batch_size=4, lr=1e-3, progress=False, cpu=True)


# -- bad files, made cheaply -------------------------------------------------------------


def _png(path: Path, width: int, height: int) -> None:
    """A white 1-bit PNG of any size, written row by row (a 10,000 x 10,000 one is 32 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    z = zlib.compressobj()
    pixels = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _jpeg_bytes(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _exif_rotated_jpeg(path: Path) -> None:
    """Stored 40 wide x 20 high, red in the stored top-left quadrant, EXIF orientation 6
    ("rotate 90 degrees clockwise to display"): the user sees 20 x 40, red at the top right."""
    stored = np.full((20, 40, 3), 255, np.uint8)
    stored[:10, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.write_bytes(_jpeg_bytes(stored, exif=exif))


def _bad_images(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what load_rgb does: "ok" or the start of the reason it gives)."""
    rng = np.random.default_rng(0)
    photo = _jpeg_bytes(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    files = {name: folder / name for name in (
        "missing.jpg", "corrupt.jpg", "truncated.jpg", "no-end-marker.jpg", "gray.png", "rgba.png", "palette.png", "png16.png",
        "exif.jpg", "huge.png", "bomb.png")}
    files["corrupt.jpg"].write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    files["truncated.jpg"].write_bytes(photo[: len(photo) // 2])
    files["no-end-marker.jpg"].write_bytes(photo[:-2])  # all but the final EOI marker
    Image.new("L", (32, 24), 128).save(files["gray.png"])
    Image.new("RGBA", (32, 24), (255, 0, 0, 128)).save(files["rgba.png"])
    Image.new("RGB", (32, 24), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(files["palette.png"])
    Image.fromarray(np.tile(np.array([[60000, 200]], np.uint16), (24, 16))).save(files["png16.png"])
    _exif_rotated_jpeg(files["exif.jpg"])
    _png(files["huge.png"], 10_000, 10_000)  # 100 M pixels: below the limit, decoded
    _png(files["bomb.png"], 30_000, 30_000)  # 900 M pixels: refused from the header
    outcome = {"missing.jpg": "image file not found", "corrupt.jpg": "cannot decode image",
               "truncated.jpg": "cannot decode image (OSError: image file is truncated",
               "no-end-marker.jpg": "cannot decode image (OSError: image file is truncated",
               "bomb.png": "image too large"}
    return {name: (path, outcome.get(name, "ok")) for name, path in files.items()}


def test_bad_images_are_converted_or_refused_with_a_reason(tmp_path):
    for name, (path, expected) in _bad_images(tmp_path).items():
        if expected != "ok":
            with pytest.raises(ValueError) as error:
                load_rgb(str(path))
            assert str(error.value).startswith(expected), (name, str(error.value))
            continue
        image = load_rgb(str(path))
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        if name == "huge.png":
            assert image.shape == (10_000, 10_000, 3) and image.min() == 255
        if name == "png16.png":  # 16-bit values scale to 8 bits: 60000 -> 233, 200 -> 1
            assert image[0, 0, 0] == 233 and image[0, 1, 0] == 1
        if name == "rgba.png":  # composited on black
            assert tuple(image[0, 0]) == (128, 0, 0)
    # PIL's own bomb guard is a global that some libraries switch off: the header check still holds.
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with pytest.raises(ValueError, match=f"image too large .*the limit is {MAX_IMAGE_PIXELS:,}"):
            load_rgb(str(tmp_path / "bomb.png"))
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def test_exif_rotation_shows_pixels_and_boxes_as_the_user_sees_them(tmp_path, tiny_checkpoint):
    path = tmp_path / "exif.jpg"
    _exif_rotated_jpeg(path)
    image = load_rgb(str(path))
    assert image.shape == (40, 20, 3)  # displayed: 20 wide, 40 high
    red = (image[..., 0] > 200) & (image[..., 1] < 60)
    assert red[:20, 10:].mean() > 0.9 and red[:, :10].mean() < 0.05 and red[20:].mean() < 0.05

    # Training sees the same pixels: the box of the red quadrant as the user drew it covers red.
    ds = fo.Dataset()
    ds.add_sample(fo.Sample(filepath=str(path), expression="the red square", ground_truth=fo.Detections(
        detections=[fo.Detection(label="the red square", bounding_box=[0.5, 0.0, 0.5, 0.5])])))
    records = read_records(ds)
    item = GroundingDataset(records, 64, (0.0,) * 3, (1.0,) * 3, augment="none")[0]
    pixels = item["pixel_values"]  # (3, 64, 64) in [0, 1]
    x0, y0, x1, y1 = (round(v * 64) for v in item["boxes"][0].tolist())
    inside = pixels[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2]
    assert inside[0].min() > 0.8 and inside[1].max() < 0.25
    ds.delete()

    # Predictions come back in the displayed frame: 20 x 40 pixels.
    out = predict_and_crop(str(path), "the red square", str(tiny_checkpoint), out_dir=str(tmp_path / "pred"),
                           device="cpu")
    x0, y0, x1, y1 = out["box_pixels"]
    assert 0 <= x0 < x1 <= 20 + 1e-3 and 0 <= y0 < y1 <= 40 + 1e-3
    assert Image.open(out["annotated_path"]).size == (20, 40)


# -- one dataset of every bad input: train, apply, evaluate go on and say what they skipped ----


@pytest.fixture
def bad_dataset(synthetic_dataset, dataset_name, tmp_path):
    """2 good images (4 samples) + one sample per bad image, phrase and box.

    Returns (dataset, {sample id: expected skip reason prefix}, {case name: sample id}).
    """
    good = synthetic_dataset.match({"split": "train"}).limit(4)
    ds = good.clone(dataset_name)
    good_path = ds.first().filepath
    box = [0.25, 0.25, 0.5, 0.5]
    cases, reasons = {}, {}  # name -> (filepath, phrase, box, split); name -> expected skip reason
    for name, (path, outcome) in _bad_images(tmp_path).items():
        split = "val" if name in ("bomb.png", "gray.png") else "train"  # bad input in validation too
        cases[f"image {name}"] = (str(path), "the white shape", box, split)
        if outcome != "ok":
            reasons[f"image {name}"] = outcome
    phrases = {"phrase missing": None, "phrase empty": "", "phrase whitespace": " \t\n ",
               "phrase 10,000 characters": LONG_PHRASE, "phrase non-ASCII": "der grüne Kreis, ganz links — café",
               "phrase emoji": "the 🔴 circle 😀 on the left"}
    for name, phrase in phrases.items():
        cases[name] = (good_path, phrase, box, "train")
    boxes = {"box partly outside": [0.8, 0.8, 0.4, 0.4], "box zero area": [0.1, 0.1, 0.0, 0.2],
             "box negative size": [0.5, 0.1, -0.2, 0.2], "box NaN": [math.nan, 0.1, 0.2, 0.2], "box none": None}
    for name, b in boxes.items():
        cases[name] = (good_path, "the red circle", b, "train")
    samples = []
    for path, phrase, b, split in cases.values():
        gt = fo.Detections(detections=[fo.Detection(label=str(phrase), bounding_box=b)]) if b else None
        samples.append(fo.Sample(filepath=path, expression=phrase, split=split, ground_truth=gt))
    ids = dict(zip(cases, ds.add_samples(samples)))
    reasons.update({"phrase missing": "missing or empty phrase", "phrase empty": "missing or empty phrase",
                    "phrase whitespace": "missing or empty phrase", "box zero area": "box has zero or negative area",
                    "box negative size": "box has zero or negative area", "box NaN": "box has non-finite coordinates",
                    "box none": "no box in 'ground_truth'"})
    return ds, {ids[name]: why for name, why in reasons.items()}, ids


def _assert_skips(skipped, expected: dict[str, str]) -> None:
    """Each expected sample skipped exactly once with its reason, and nothing else."""
    got = {}
    for sid, why in skipped:
        assert sid not in got, f"{sid} reported twice: {got[sid]!r} and {why!r}"
        got[sid] = why
    assert set(got) == set(expected), (got, expected)
    for sid, why in got.items():
        assert why.startswith(expected[sid]), (why, expected[sid])


def test_training_applying_and_evaluating_go_on_around_bad_input(bad_dataset, tiny_checkpoint, tmp_path,
                                                                  caplog, capsys):
    ds, expected, ids = bad_dataset
    caplog.set_level(logging.WARNING, logger="fiftyone_grounding")

    result = fit(ds, out_dir=str(tmp_path / "run"), epochs=2, seed=0, **TINY_FIT)
    _assert_skips(result.skipped, expected)  # once each, although every epoch meets them again
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in result.history)
    printed = capsys.readouterr().out
    summary = printed.strip().splitlines()[-1]
    assert summary.startswith(f"Skipped {len(expected)} samples: ") and "3 x missing or empty phrase" in summary
    assert sum(CUT_WARNING in r.getMessage() for r in caplog.records) == 1  # one warning per run
    records = read_records(ds)
    assert records.boxes[records.sample_ids.index(ids["box partly outside"])] == pytest.approx([0.8, 0.8, 1.0, 1.0])

    caplog.clear()
    model = GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")
    run = apply_grounding_model(ds, model, label_field="pred", batch_size=8)
    assert run["processed"] == len(ds)
    unreadable = {sid: why for sid, why in expected.items() if "box" not in why}  # apply needs no box
    _assert_skips(run["skipped"], unreadable)
    assert sum(CUT_WARNING in r.getMessage() for r in caplog.records) == 1
    assert any("No prediction for 8 samples" in r.getMessage() for r in caplog.records)
    for sid, phrase, labels in zip(*ds.values(["id", "expression", "pred.detections.expression"])):
        assert (labels is None) == (sid in unreadable), (phrase, labels)
        if labels is not None:
            assert labels == [" ".join(phrase.split())[:MAX_EXPRESSION_CHARS]]  # emoji and accents kept

    metrics = evaluate_grounding(ds, "pred", "ground_truth", split_field="split")
    assert metrics["missing_predictions"] == len(unreadable)
    assert metrics["unscored"] == 4  # zero area, negative size, NaN, no ground truth
    assert metrics["overall"]["count"] == len(ds) - 4
    assert "no valid ground-truth box" in capsys.readouterr().out
    in_app = evaluate_in_fiftyone(ds, "pred", "ground_truth", eval_key="eval", split_field=None)
    assert in_app["overall"]["count"] == len(ds) - 4 and math.isfinite(in_app["overall"]["miou"])


def test_a_diverging_loss_stops_training_and_names_the_step_and_samples(synthetic_dataset, tmp_path):
    few = synthetic_dataset.match({"split": "train"}).limit(16)
    with pytest.raises(TrainingError) as error:
        # AdamW moves every weight by about lr per step: 1e30 overflows float32 at the next forward.
        fit(few, out_dir=str(tmp_path), epochs=1, train_split=None, val_split=None, **{**TINY_FIT, "lr": 1e30})
    message = str(error.value)
    assert "Non-finite loss" in message and "at epoch 1, step " in message and "lower the learning rate" in message
    named = json.loads(message.split("batch samples: ")[1].split("]")[0].replace("'", '"') + "]")
    assert named and set(named) <= set(few.values("id"))


# -- training killed at any point ---------------------------------------------------------

KILLED_FIT = r"""
import json, sys, time
from pathlib import Path
import fiftyone as fo
from fiftyone_grounding.engine.fit import fit

name, out, go, marker, kwargs = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
while not go.exists():  # imported; wait until the reference run has finished
    time.sleep(0.05)

def hold_in_epoch_2(fraction, label):
    if fraction > 1 / kwargs["epochs"]:  # epoch 1 is saved; epoch 2 has taken a step
        open(marker, "w").write(label)
        time.sleep(600)  # the test kills us here

fit(fo.load_dataset(name), out_dir=out, progress_callback=hold_in_epoch_2, **kwargs)
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the training process ended early: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.1)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(synthetic_dataset, dataset_name, tmp_path,
                                                                      capsys):
    ds = synthetic_dataset.match({"split": "train"}).limit(16).clone(dataset_name)
    ds.persistent = True  # the training process loads it by name
    kwargs = dict(TINY_FIT, epochs=3, seed=5, train_split=None, val_split=None)
    out, go, marker = tmp_path / "killed", tmp_path / "go", tmp_path / "in_epoch_2"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FIT, dataset_name, str(out), str(go), str(marker),
                             json.dumps(kwargs)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        straight = fit(ds, out_dir=str(tmp_path / "straight"), **kwargs)  # while the process imports
        go.touch()
        _wait_for(marker, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / "last" / "training_state.json").read_text())["epoch"] == 0

    # Also the worst moment of a save: atomic_write_dir moved last/ aside and died before
    # renaming the new folder in; a half-written temporary folder lies beside it.
    os.replace(out / "last", out / ".last.old")
    (out / ".last.tmp-deadbeef").mkdir()
    (out / ".last.tmp-deadbeef" / WEIGHTS_NAME).write_bytes(b"half a file")
    assert resolve_checkpoint_dir(out / "last") == out / ".last.old"
    assert load_checkpoint(out / "last").config == get_config("tiny")

    capsys.readouterr()
    resumed = fit(ds, out_dir=str(out), **kwargs)
    assert f"Resuming from {out / '.last.old'} after epoch 1" in capsys.readouterr().out  # not from scratch
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert (out / "last" / CONFIG_NAME).exists() and not (out / ".last.old").exists()
    a = load_file(str(straight.last_dir / WEIGHTS_NAME))
    b = load_file(str(out / "last" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise on the CPU


def _save_version_0(path: Path, weights: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        save_numpy({"w": weights}, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps({"version": 0}))

    atomic_write_dir(path, write)


def _save_forever(path: str, arrays: list) -> None:
    """Child process: write version 1, 2, 3, ... of a checkpoint folder until killed."""
    version = 0
    while True:
        version += 1

        def write(tmp: Path, v=version) -> None:
            save_numpy({"w": arrays[v % len(arrays)]}, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps({"version": v}))

        atomic_write_dir(path, write)


@pytest.mark.slow
def test_sigkill_during_saves_always_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    arrays = [np.full((512, 512), float(v), np.float32) for v in range(7)]  # 1 MB each
    rng = np.random.default_rng(0)
    _save_version_0(path, arrays[0])
    fork = multiprocessing.get_context("fork")  # starts at once: nothing to import again
    versions = []
    for _ in range(12):
        child = fork.Process(target=_save_forever, args=(str(path), arrays), daemon=True)
        child.start()
        time.sleep(0.05 + rng.random() * 0.25)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        folder = resolve_checkpoint_dir(path)
        version = json.loads((folder / CONFIG_NAME).read_text())["version"]
        weights = load_numpy(str(folder / WEIGHTS_NAME))["w"]
        assert np.all(weights == version % len(arrays)), (folder, version)  # whole, and from one save
        versions.append(version)
    assert max(versions) > 1  # the children did save, again and again


# -- an interrupted apply keeps its predictions and finishes the rest ----------------------


def test_interrupted_apply_keeps_what_it_wrote_and_a_second_run_does_the_rest(
        synthetic_dataset, dataset_name, tiny_checkpoint, grounding_plugin_dir, count_forwards):
    ds = synthetic_dataset.limit(24).clone(dataset_name)
    model = GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu")
    apply_grounding_model(ds, model, label_field="reference", batch_size=4)
    reference = ds.values("reference.detections.bounding_box")

    batches = []
    predict_boxes = model.predict_boxes

    def interrupted_at_batch_3(*args, **kwargs):
        batches.append(len(batches))
        if len(batches) == 3:
            raise KeyboardInterrupt  # Ctrl-C (FiftyOne skips failed batches, but not this)
        return predict_boxes(*args, **kwargs)

    model.predict_boxes = interrupted_at_batch_3
    with pytest.raises(KeyboardInterrupt):  # with a batch in flight, as on a GPU
        apply_grounding_model(ds, model, label_field="pred", batch_size=4, overlap=True)
    del model.predict_boxes
    written = fo.load_dataset(dataset_name).values("pred.detections.bounding_box")
    # batches 1-2 saved, intact (batch 2 was still in flight when batch 3 was interrupted)
    assert written[:8] == reference[:8] and written[8:] == [None] * 16

    forwards = count_forwards(model)
    run = apply_grounding_model(ds, model, label_field="pred", batch_size=4, skip_existing=True)
    assert run == {"processed": 16, "skipped": []} and forwards.calls == 4
    assert ds.values("pred.detections.bounding_box") == reference

    # The operator and the CLI take the same option; with nothing left they do nothing.
    result = foo.execute_operator("@fiftyone-grounding/grounding/apply_grounding_model", ctx={"dataset": ds, "params": {
        "model": str(tiny_checkpoint), "label_field": "pred", "skip_existing": True}})
    assert shown_results(result)["num_predictions"] == len(ds)
    cli_main(["apply", "--dataset", dataset_name, "--checkpoint", str(tiny_checkpoint), "--label-field", "pred",
              "--skip-existing", "--device", "cpu"])
    assert ds.values("pred.detections.bounding_box") == reference


@pytest.mark.parametrize("params, message", [
    ({"batch_size": 0}, "Value must be greater than 1"),
    ({"skip_existing": "yes"}, "Invalid value type"),
    ({"label_field": "../pred"}, "is not a valid field name"),
    ({"model": str(REPO / "manifest.json")}, "No checkpoint at"),
    ({"label_field": "expression"}, "is a StringField, not a Detections field"),
])
def test_the_apply_operator_checks_its_inputs_before_it_starts(synthetic_dataset, dataset_name, tiny_checkpoint,
                                                               grounding_plugin_dir, params, message):
    ds = synthetic_dataset.limit(4).clone(dataset_name)
    with pytest.raises(ExecutionError, match=message):
        foo.execute_operator("@fiftyone-grounding/grounding/apply_grounding_model", ctx={"dataset": ds, "params": {
            "model": str(tiny_checkpoint), "label_field": "pred", **params}})
    assert not ds.has_field("pred")


# -- concurrent apply runs --------------------------------------------------------------

CONCURRENT_APPLY = r"""
import sys, time
from pathlib import Path
import fiftyone as fo
from fiftyone_grounding.inference.apply import apply_grounding_model
from fiftyone_grounding.inference.model import GroundingModel

name, checkpoint, field, ready, other = sys.argv[1:6]
dataset = fo.load_dataset(name)
model = GroundingModel.from_checkpoint(checkpoint, device="cpu")
Path(ready).touch()
while not Path(other).exists():  # start together
    time.sleep(0.01)
apply_grounding_model(dataset, model, label_field=field, batch_size=2)
"""


@pytest.mark.slow
def test_two_processes_applying_to_one_dataset_do_not_disturb_each_other(synthetic_dataset, dataset_name,
                                                                        tiny_checkpoint, tmp_path):
    ds = synthetic_dataset.limit(24).clone(dataset_name)
    ds.persistent = True
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ready = {f: tmp_path / f"ready_{f}" for f in ("pred_a", "pred_b")}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_APPLY, dataset_name, str(tiny_checkpoint), field,
                               str(ready[field]), str(ready[other])],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for field, other in (("pred_a", "pred_b"), ("pred_b", "pred_a"))]
    # A third run, here, while they start: the boxes each process must reproduce.
    apply_grounding_model(ds, GroundingModel.from_checkpoint(tiny_checkpoint, device="cpu"),
                          label_field="reference", batch_size=2)
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    ds.reload()
    assert {"pred_a", "pred_b"} <= set(ds.get_field_schema())
    reference = np.array([b[0] for b in ds.values("reference.detections.bounding_box")])
    for field in ("pred_a", "pred_b"):
        boxes = ds.values(f"{field}.detections.bounding_box")
        assert all(b is not None and len(b) == 1 for b in boxes), field
        np.testing.assert_allclose(np.array([b[0] for b in boxes]), reference, atol=1e-5)


# -- untrusted files ----------------------------------------------------------------------


class _Evil:
    """Unpickling this calls os.mkdir(marker): proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_malicious_pickle_is_never_run(tiny_checkpoint, tmp_path, dataset_name, cli):
    marker = tmp_path / "PWNED"
    evil_pt = tmp_path / "evil.pt"
    torch.save({"model": {"head.0.weight": _Evil(marker)}}, evil_pt)
    evil_raw = tmp_path / "evil.bin"
    evil_raw.write_bytes(pickle.dumps({"weights": _Evil(marker)}))

    for path in (evil_pt, evil_raw):
        with pytest.raises(CheckpointError, match="pickle file, which can run code.*fiftyone-grounding convert"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="pickle file"):
            GroundingModel.from_checkpoint(path)
        with pytest.raises(ValueError, match="pickle file"):
            load_grounding_model(str(path))
        with pytest.raises(CheckpointError, match="loading it would run code from the file, so it is not converted"):
            convert_checkpoint(path, tmp_path / "converted", preset="tiny")
        code, _, err = cli("convert", path, tmp_path / "converted", "--preset", "tiny")
        assert code == 2 and "would run code" in err and "Traceback" not in err

    # A pickle named model.safetensors in a checkpoint folder.
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / CONFIG_NAME).write_text((Path(tiny_checkpoint) / CONFIG_NAME).read_text())
    (disguised / WEIGHTS_NAME).write_bytes(evil_pt.read_bytes())
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        load_checkpoint(disguised)

    # A config.json that names an encoder folder holding a pickled pytorch_model.bin.
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text((tiny_encoder_dir("tiny:dinov3") / "config.json").read_text())
    (encoder / "pytorch_model.bin").write_bytes(evil_pt.read_bytes())
    config = json.loads((Path(tiny_checkpoint) / CONFIG_NAME).read_text())
    (disguised / CONFIG_NAME).write_text(json.dumps({**config, "image_encoder": str(encoder)}))
    (disguised / WEIGHTS_NAME).write_bytes((Path(tiny_checkpoint) / WEIGHTS_NAME).read_bytes())
    with pytest.raises(EncoderUnavailableError, match="model.safetensors"):
        load_checkpoint(disguised)

    assert not marker.exists()


@pytest.mark.parametrize("model_type", ["dinov3_vit", "evil"])
def test_an_encoder_config_that_asks_for_custom_code_never_runs_it(tmp_path, model_type):
    """An encoder folder whose config.json names custom code (``auto_map``): a known model type
    loads its standard class, an unknown one is refused; the module is never imported, and
    transformers does not stop to ask on stdin whether to run it."""
    marker = tmp_path / "PWNED"
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_encoder_dir("tiny:dinov3"), encoder)
    config = json.loads((encoder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (encoder / "config.json").write_text(json.dumps(config))
    (encoder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).mkdir()\n")
    if model_type == "dinov3_vit":
        assert type(load_encoder(str(encoder))).__name__ == "DINOv3ViTModel"
    else:
        with pytest.raises(EncoderUnavailableError, match="asks for custom code .* never runs") as error:
            load_encoder(str(encoder))
        assert "\n" not in str(error.value)
    assert not marker.exists()


def test_convert_turns_a_state_dict_into_a_safetensors_checkpoint(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    # As a DDP training script would have saved it: everything, prefixed, in a wrapper.
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
               tmp_path / "old.pt")
    cli_main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "new"), "--preset", "tiny"])
    converted = load_file(str(tmp_path / "new" / WEIGHTS_NAME))
    assert converted.keys() == model.trainable_state_dict().keys()
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(converted[k], v), k
    assert load_checkpoint(tmp_path / "new").config == model.config

    torch.save({"head.0.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not match preset 'tiny'.*pass the preset"):
        convert_checkpoint(tmp_path / "other.pt", tmp_path / "x", preset="tiny")


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "adamw"}, "Unknown GrounderConfig keys: \\['optimizer'\\]"),
    ({"image_size": "224"}, "image_size must be an integer"),
    ({"image_size": 10**9}, "image_size must be an integer in"),
    ({"d_model": "big"}, "d_model must be an integer"),
    ({"dropout": True}, "dropout must be a number"),
    ({"norm_first": "yes"}, "norm_first must be true or false"),
    ({"loss_weights": {"l1": "heavy"}}, "loss_weights an object of numbers"),
    ({"loss_weights": {"l1": -1.0}}, "loss_weights must be finite, >= 0"),
    ({"loss_weights": {"os.system": 1.0}}, "loss_weights keys must be among"),
    ({"image_mean": 0.5}, "image_mean and image_std must be lists of 3 numbers"),
    ({"image_std": [0.2, 0.2, float("inf")]}, "3 finite values"),
    ({"image_encoder": ["a"]}, "image_encoder and text_encoder must be strings"),
    ({"query": "__import__('os')"}, "query must be one of"),
])
def test_a_config_json_with_bad_types_or_keys_is_refused(tiny_checkpoint, tmp_path, change, message):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = json.loads((Path(tiny_checkpoint) / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, **change}))
    (folder / WEIGHTS_NAME).write_bytes((Path(tiny_checkpoint) / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match=message):
        load_checkpoint(folder)
    with pytest.raises(ValueError, match=message):
        GrounderConfig.from_dict({**config, **change})


def test_zoo_paths_cannot_escape_the_model_folder(tiny_checkpoint, tmp_path, monkeypatch):
    zoo = tmp_path / "zoo" / "models"
    monkeypatch.setattr(fo.config, "model_zoo_dir", str(zoo))
    monkeypatch.setenv(DEMO_CHECKPOINT_ENV, str(tiny_checkpoint))
    victim = tmp_path / "victim"  # a folder that a download must never replace
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    for escaping in (zoo / ".." / ".." / "victim.tar.gz", tmp_path / "victim.tar.gz", zoo.parent / "x.tar.gz"):
        with pytest.raises(ValueError, match="outside FiftyOne's model zoo folder"):
            download_model(DEMO, str(escaping))
        with pytest.raises(ValueError, match="outside FiftyOne's model zoo folder"):
            load_model(DEMO, str(escaping))
    assert (victim / "keep.txt").read_text() == "mine" and sorted(os.listdir(victim)) == ["keep.txt"]
    download_model(DEMO, str(zoo / "tiny-synthetic-demo.tar.gz"))  # inside: fine
    assert (zoo / "tiny-synthetic-demo" / WEIGHTS_NAME).is_file()

    manifest = json.loads((REPO / "manifest.json").read_text())
    validate_manifest(manifest)  # ours is valid
    model = manifest["models"][0]
    for bad, message in (
        ({**manifest, "name": "../../escape"}, "name '../../escape' must be 'owner/name'"),
        ({**manifest, "models": "all"}, "models must be a non-empty list"),
        ({**manifest, "models": [{**model, "base_filename": "../../x.tar.gz"}]}, "must be a plain file name"),
        ({**manifest, "models": [{**model, "base_name": "evil/model"}]}, "base_name 'evil/model' is not one of"),
        ({**manifest, "models": [{**model, "version": 3}]}, "version must be a string or null"),
    ):
        with pytest.raises(ValueError, match=message):
            validate_manifest(bad)
    source = tmp_path / "source"
    source.mkdir()
    (source / "manifest.json").write_text(json.dumps({**manifest, "name": "../../escape"}))
    with pytest.raises(ValueError, match="Invalid manifest.json"):
        register_local_source(str(source))
    assert not (zoo.parent.parent / "escape").exists()
