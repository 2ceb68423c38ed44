"""The RefCOCO recipe script, end to end, on data written in the real jxu124 schema (tiny preset)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_refcoco import draw_images, make_source, save

REPO = Path(__file__).resolve().parents[1]


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
