"""The command line: --help everywhere, summary, predict, and the demo end to end (small)."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from fiftyone_grounding.cli import main

COMMANDS = ["demo", "summary", "train", "apply", "evaluate", "predict", "import-refcoco", "convert"]


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(([command] if command else []) + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fiftyone-grounding" in out and len(out) > 200


def _subparsers():
    import argparse

    from fiftyone_grounding.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_says_what_it_does():
    for name, parser in _subparsers().items():
        bare = [a.option_strings or [a.dest] for a in parser._actions if not a.help]
        assert not bare, f"{name}: options without help text: {bare}"


def test_train_help_names_the_defaults_of_fit():
    """`train` leaves unset flags to fit(), so its help text states fit()'s defaults: they must agree."""
    import inspect
    import re

    from fiftyone_grounding.train import fit

    defaults = {k: v.default for k, v in inspect.signature(fit).parameters.items()}
    checked = 0
    own = {"preset", "out_dir"}  # the command's own defaults: seed, runs/PRESET
    for action in _subparsers()["train"]._actions:
        if action.dest in own:
            continue
        stated = re.search(r"\(default: ([^)]*)\)$", action.help or "")
        if action.dest in defaults and stated and action.default is None:
            value = defaults[action.dest]
            if value is None:  # chosen by the device
                assert "GPU" in stated.group(1), action.dest
            else:
                assert stated.group(1) == str(value), (action.dest, stated.group(1), value)
            checked += 1
    assert checked >= 7

def test_console_script_is_declared():
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert data["project"]["scripts"]["fiftyone-grounding"] == "fiftyone_grounding.cli:main"


def test_summary_prints_seed_counts(capsys):
    main(["summary", "--preset", "seed"])
    out = capsys.readouterr().out
    assert "total params:     144,968,836" in out and "trainable params: 25,948,420" in out


def test_predict_writes_crop_and_boxed_image(tiny_checkpoint, tmp_path, capsys):
    image = Image.new("RGB", (128, 96), (24, 24, 24))
    ImageDraw.Draw(image).ellipse((10, 20, 40, 50), fill=(220, 30, 30))
    path = tmp_path / "scene.png"
    image.save(path)
    main(["predict", str(path), "the red circle", "--checkpoint", str(tiny_checkpoint),
          "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    x0, y0, x1, y1 = (float(v) for v in out.split("xyxy): ")[1].split()[:4])
    assert 0 <= x0 <= x1 <= 128 and 0 <= y0 <= y1 <= 96
    assert Image.open(tmp_path / "out" / "scene_box.png").size == (128, 96)
    crop = Image.open(tmp_path / "out" / "scene_crop.png")
    assert crop.size == (max(1, round(x1) - round(x0)), max(1, round(y1) - round(y0)))


def test_demo_end_to_end_small(tmp_path, dataset_name):
    out = tmp_path / "metrics.json"
    main(["demo", "--out-dir", str(tmp_path / "demo"), "--dataset-name", dataset_name, "--num-images", "60",
          "--epochs", "2", "--json", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert set(result["test"]) >= {"miou", "acc50", "acc75"}
    assert 0 <= result["test"]["miou"] <= 1 and 0 < result["constant_box_miou"] < 1
    assert result["versions"]["torch"] == torch.__version__.split("+")[0]  # metadata has no local tag
    assert result["versions"]["fiftyone"] and result["versions"]["transformers"]
    assert result["machine"]["cpu"] and result["machine"]["torch_threads"] == torch.get_num_threads()
    assert result["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    import fiftyone as fo

    ds = fo.load_dataset(dataset_name)
    test = ds.match_tags("test")
    assert test.count("predictions") == len(test) > 0
    assert ds.has_field("predictions_iou")


def test_cli_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "fiftyone_grounding.cli", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_bad_input_ends_with_one_error_line_not_a_traceback(synthetic_dataset, dataset_name, tiny_checkpoint):
    synthetic_dataset.limit(4).clone(dataset_name)
    with pytest.raises(SystemExit, match=r"^error: The field 'expression' already holds StringField, not Detections"):
        main(["apply", "--dataset", dataset_name, "--checkpoint", str(tiny_checkpoint), "--label-field", "expression",
              "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"^error: no FiftyOne dataset named 'no-such-dataset'"):
        main(["apply", "--dataset", "no-such-dataset", "--checkpoint", str(tiny_checkpoint)])
