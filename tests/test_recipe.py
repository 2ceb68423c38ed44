"""The RefCOCO recipe script, end to end, on data written in the real jxu124 schema (tiny preset)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refcoco_files import draw_images, make_source, save

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("fiftyone-grounding", path=str(Path(sys.executable).parent)) is None,
                    reason="the package is not installed (pip install -e .): no fiftyone-grounding command")
def test_refcoco_script_imports_trains_and_evaluates(tmp_path, dataset_name):
    source = save(make_source(), tmp_path / "refcoco_hf")
    images = draw_images(tmp_path / "train2014")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               REFCOCO_SOURCE=source, REFCOCO_DATASET=dataset_name)
    proc = subprocess.run(["bash", str(REPO / "training" / "refcoco.sh"), "tiny", images], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "refcoco-tiny"
    assert (run / "best" / "model.safetensors").exists() and (run / "curves.png").exists()
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert set(metrics["splits"]) == {"testA", "testB"}
    assert metrics["overall"]["count"] == 3 and metrics["missing_predictions"] == 0
    assert "testA" in proc.stdout and "Acc@0.5" in proc.stdout


RECIPES = sorted((REPO / "training").glob("*.json"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_is_a_valid_training_config(path):
    from fiftyone_grounding.models.config import PRESETS
    from fiftyone_grounding.engine.config import TrainConfig

    recipe = TrainConfig.from_json(path)  # unknown keys and bad values are refused here
    assert recipe.preset in PRESETS and path.stem.endswith(recipe.preset.replace("-", "_"))
    if recipe.preset in ("fusion", "adapter"):  # the papers' recipe: long, box-preserving scale, no flips
        assert 60 <= recipe.epochs <= 90 and recipe.warmup_frac > 0
        assert recipe.augment == "scale+color" and not recipe.cache_features


@pytest.mark.parametrize("name, twin", [("refcoco_fusion", "tiny-fusion"), ("refcoco_adapter", "tiny-adapter")])
def test_the_v2_recipes_train_on_their_tiny_twins(synthetic_dataset, tmp_path, name, twin):
    """The recipe as written (scale + colour augmentation on the fly, its schedule), with the
    tiny twin of its preset, for one epoch on the CPU."""
    from fiftyone_grounding.engine.config import TrainConfig
    from fiftyone_grounding.engine.fit import fit

    recipe = TrainConfig.from_json(REPO / "training" / f"{name}.json")
    result = fit(synthetic_dataset, recipe.merged(preset=twin, epochs=1, batch_size=16, num_workers=0,
                                                  out_dir=str(tmp_path / "run")), progress=False, cpu=True)
    assert (result.best_dir / "model.safetensors").exists()
    saved = TrainConfig.from_json(tmp_path / "run" / "train_config.json")
    assert saved.augment == "scale+color" and saved.lr == recipe.lr and saved.preset == twin
