"""The command line: --help everywhere, summary, predict, and the demo end to end (small)."""

import json
import os
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from fiftyone_grounding.cli import main
from fiftyone_grounding.models.config import PRESETS

COMMANDS = ["demo", "summary", "train", "apply", "evaluate", "predict", "import-refcoco", "convert", "migrate-labels",
            "search", "push-to-hub"]


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


def test_train_options_come_from_the_defaults_then_the_recipe_then_the_flags(tmp_path):
    from fiftyone_grounding.cli import build_parser, train_config_from_args
    from fiftyone_grounding.engine.config import TrainConfig

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"preset": "tiny", "epochs": 3, "lr": 0.002, "model": {"image_size": 32}}))
    args = build_parser().parse_args(["train", "--dataset", "d", "--recipe", str(recipe), "--lr", "0.005",
                                      "--image-encoder", "tiny:dinov3", "--val-split", "test"])
    config = train_config_from_args(args)
    defaults = TrainConfig()
    assert (config.preset, config.epochs, config.lr, config.val_split) == ("tiny", 3, 0.005, "test")
    assert config.model == {"image_size": 32, "image_encoder": "tiny:dinov3"}
    assert (config.batch_size, config.augment, config.weight_decay) == (
        defaults.batch_size, defaults.augment, defaults.weight_decay)
    assert config.resolved_out_dir() == os.path.join("runs", "tiny")
    bare = train_config_from_args(build_parser().parse_args(["train", "--dataset", "d"]))
    assert bare == defaults


def test_summary_prints_seed_counts(capsys):
    main(["summary", "--preset", "seed"])
    out = capsys.readouterr().out
    assert "total params:     144,968,836" in out and "trainable params: 25,948,420" in out
    main(["summary", "--preset", "all"])  # one line per preset, the real encoder configs
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(PRESETS)
    assert rows["seed"][-2:] == ["144,968,836", "25,948,420"]
    assert rows["fusion"][1:3] == ["fusion", "384"] and rows["adapter"][1:3] == ["adapter", "384"]


def test_predict_writes_crop_and_boxed_image(tiny_checkpoint, tmp_path, capsys):
    image = Image.new("RGB", (128, 96), (24, 24, 24))
    ImageDraw.Draw(image).ellipse((10, 20, 40, 50), fill=(220, 30, 30))
    path = tmp_path / "scene.png"
    image.save(path)
    main(["predict", str(path), "the red circle", "--checkpoint", str(tiny_checkpoint),
          "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    x0, y0, x1, y1 = (float(v) for v in out.split("xyxy): ")[1].split(",")[0].split(";")[0].split())
    assert 0 <= x0 <= x1 <= 128 and 0 <= y0 <= y1 <= 96
    assert Image.open(tmp_path / "out" / "scene_box.png").size == (128, 96)
    crop = Image.open(tmp_path / "out" / "scene_crop.png")
    assert crop.size == (max(1, round(x1) - round(x0)), max(1, round(y1) - round(y0)))


@pytest.mark.parametrize("score_thresh, boxes", [(0.0, 10), (1.0, 0)])
def test_predict_writes_every_box_of_a_multi_box_model_or_says_there_is_none(tmp_path, capsys, score_thresh,
                                                                             boxes):
    """A multi-box checkpoint whose threshold keeps every query's box, or none."""
    from fiftyone_grounding.models.checkpoint import save_checkpoint
    from fiftyone_grounding.models.build import build_model

    torch.manual_seed(0)
    save_checkpoint(build_model("tiny-fusion-multi", score_thresh=score_thresh), tmp_path / "ckpt")
    image = Image.new("RGB", (128, 96), (24, 24, 24))
    path = tmp_path / "scene.png"
    image.save(path)
    main(["predict", str(path), "all the red shapes", "--checkpoint", str(tmp_path / "ckpt"),
          "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert out.count("box (pixels, xyxy)") == boxes and ("no box" in out) == (boxes == 0)
    crops = sorted((tmp_path / "out").glob("scene_crop*.png")) if boxes else []
    assert len(crops) == boxes and (tmp_path / "out" / "scene_box.png").exists() == (boxes > 0)
    confidences = [float(line.split("confidence ")[1].split(";")[0]) for line in out.splitlines() if "confidence" in line]
    assert confidences == sorted(confidences, reverse=True)  # the most confident first


@pytest.mark.slow
def test_the_grec_demo_end_to_end_small(tmp_path, dataset_name):
    """demo --task grec: both models trained, applied and scored as gRefCOCO's scorer, per kind."""
    out = tmp_path / "grec.json"
    main(["demo", "--task", "grec", "--out-dir", str(tmp_path / "demo"), "--dataset-name", dataset_name,
          "--num-images", "60", "--epochs", "1", "--json", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    assert set(result["test"]) == {"multi", "one_box"}
    for scores in result["test"].values():
        assert set(scores["overall"]) >= {"pr_f1", "n_acc", "t_acc", "count", "no_target"}
        assert set(scores["by_kind"]) == {"attribute", "several", "none"}
        assert [r["score_thresh"] for r in scores["sweep"]] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    # the multi-box model wrote its boxes from 0.7: no sweep row below it; the one-box model wrote every box
    assert [r["answered"] for r in result["test"]["multi"]["sweep"]] == [False] * 4 + [True] * 3
    assert all(r["pr_f1"] is None for r in result["test"]["multi"]["sweep"][:4])
    assert all(r["answered"] for r in result["test"]["one_box"]["sweep"])
    assert 0 <= result["no_target_with_a_box"] <= 1 and "Pr@F1=1" in result["table"]


def test_cli_runs_as_a_module(monkeypatch, capsys):
    """``python -m fiftyone_grounding.cli`` (what torchrun starts), run as ``-m`` runs it: as ``__main__``."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["fiftyone_grounding.cli", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("fiftyone_grounding.cli", run_name="__main__")
    assert done.value.code == 0 and "install-plugin" in capsys.readouterr().out


@pytest.fixture
def bad_inputs(synthetic_dataset, dataset_name, tiny_checkpoint, tmp_path):
    """One bad input per subcommand, and the message each must give."""
    synthetic_dataset.limit(4).clone(dataset_name)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"preset": "tiny", "epoch": 3}))
    missing = tmp_path / "missing"
    return {
        "demo": (["--num-images", "0", "--out-dir", tmp_path / "demo"], "num_images must be an integer >= 1"),
        "summary": (["--preset", "tiny", "--image-size", "7"], "image_size must be an integer in [16, 4096]"),
        "train": (["--dataset", dataset_name, "--recipe", recipe], "Unknown training options ['epoch']"),
        "apply": (["--dataset", dataset_name, "--checkpoint", missing], "No checkpoint at"),
        "evaluate": (["--dataset", dataset_name, "--label-field", "nope"], "The dataset has no field 'nope'"),
        "predict": ([missing / "photo.jpg", "the red circle", "--checkpoint", tiny_checkpoint, "--out-dir", tmp_path],
                    "image file not found"),
        "import-refcoco": (["refcoco", "--source", missing], "is not a folder written by save_to_disk"),
        "convert": ([missing / "old.pt", tmp_path / "new", "--preset", "tiny"], "No file"),
        "migrate-labels": (["--dataset", dataset_name, "--fields", "expression"], "are not Detections fields"),
        "search": (["--dataset", dataset_name, "the red circle", "--distributed"], "needs the ranks of a launcher"),
        "push-to-hub": ([missing, "org/name", "--dry-run", tmp_path / "out"], "No folder"),
    }


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_says_what_is_wrong_in_one_line(command, bad_inputs, cli):
    args, message = bad_inputs[command]
    code, _, err = cli(command, *args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and err.rstrip().endswith(errors[0]), err


def test_bad_input_ends_with_one_error_line_not_a_traceback(synthetic_dataset, dataset_name, tiny_checkpoint, cli):
    synthetic_dataset.limit(4).clone(dataset_name)
    code, _, err = cli("apply", "--dataset", dataset_name, "--checkpoint", tiny_checkpoint, "--label-field",
                       "expression", "--device", "cpu")
    assert code == 2 and err.startswith("error: The field 'expression' already holds StringField, not Detections")
    code, _, err = cli("apply", "--dataset", "no-such-dataset", "--checkpoint", tiny_checkpoint)
    assert code == 2 and err.startswith("error: no FiftyOne dataset named 'no-such-dataset'")


def test_search_and_label_errors_as_the_one_rank_of_a_launcher(synthetic_dataset, dataset_name, tiny_checkpoint,
                                                                cli, monkeypatch):
    """``--distributed`` where the launcher started one process (RANK 0 of WORLD_SIZE 1): the
    distributed path end to end in this process; the search prints its ranking, and the label
    errors are scored and calibrated."""
    ds = synthetic_dataset.limit(24).clone(dataset_name)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    code, out, err = cli("search", "--dataset", dataset_name, "the red circle", "--checkpoint", tiny_checkpoint,
                         "--device", "cpu", "--top", "3", "--save-view", "red circles", "--distributed")
    assert code == 0, err
    assert "'the red circle': the 3 most likely of 24 samples" in out and len(ds.load_saved_view("red circles")) == 24
    assert ds.exists("search").count() == 24
    code, out, err = cli("label-errors", "--dataset", dataset_name, "--checkpoint", tiny_checkpoint, "--device", "cpu",
                         "--no-progress", "--distributed")
    assert code == 0, err
    assert "on 1 rank; calibrating on rank 0" in out and "Scored" in out
    assert ds.exists("label_error").count() == ds.exists("label_error_signals").count() > 0
