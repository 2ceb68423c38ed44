"""Training: the loss goes down, outputs are written, resume repeats the run, 2 processes train one model."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fiftyone_grounding.config import TrainConfig
from fiftyone_grounding.data import Collator, GroundingDataset, read_records
from fiftyone_grounding.model import build_model, build_tokenizer
from fiftyone_grounding.train import configure_optimizer, cosine_with_warmup, fit, train_step

REPO = Path(__file__).resolve().parents[1]


def test_schedule_warms_up_then_decays():
    f = cosine_with_warmup(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) < f(20) and f(99) < 0.02


@pytest.mark.parametrize("preset, lr", [("tiny", 3e-3), ("tiny-fusion", 1e-3), ("tiny-adapter", 3e-3),
                                        ("tiny-fusion-multi", 1e-3)])
def test_training_steps_lower_the_loss(synthetic_dataset, preset, lr):
    """fit's own step (train_step), 60 times on one batch of 8 expressions, for each architecture."""
    torch.manual_seed(0)
    records = read_records(synthetic_dataset.match({"split": "train"}).limit(8))
    model = build_model(preset)
    cfg = model.config
    model.init_box_bias(torch.tensor(records.boxes).mean(0))
    items = GroundingDataset(records, cfg.image_size, cfg.image_mean, cfg.image_std)
    batch = Collator(build_tokenizer(cfg), cfg.max_text_len)([items[i] for i in range(len(items))])
    optimizer = configure_optimizer(model, lr=lr, weight_decay=1e-4)
    model.train()
    losses = [train_step(model, batch, optimizer, cfg.loss_weights, grad_clip=1.0)[0].item() for _ in range(60)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_training_writes_table_metrics_config_and_checkpoints(synthetic_dataset, tmp_path, capsys):
    fit(synthetic_dataset, {"preset": "tiny", "lr": 1e-3}, out_dir=str(tmp_path), epochs=4, batch_size=8,
        progress=False, cpu=True)
    printed = capsys.readouterr().out
    saved = TrainConfig.from_json(tmp_path / "train_config.json")
    assert saved == TrainConfig(preset="tiny", lr=1e-3, out_dir=str(tmp_path), epochs=4, batch_size=8)
    assert "train loss" in printed and "val IoU" in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    for d in ("best", "last"):
        assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path / d))
    assert not any(k.startswith("image_encoder") for k in load_file(str(tmp_path / "best" / "model.safetensors")))


def test_unknown_options_are_refused_by_name(synthetic_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown training options \['epoch'\]"):
        fit(synthetic_dataset, preset="tiny", epoch=3, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"\['image_size'\] are model settings: pass them as model="):
        fit(synthetic_dataset, preset="tiny", image_size=32, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        fit(synthetic_dataset, preset="tiny", epochs=0, out_dir=str(tmp_path))
    assert not (tmp_path / "last").exists()


class Interrupt(Exception):
    pass


def test_resume_continues_where_it_stopped(synthetic_dataset, tmp_path):
    kwargs = dict(preset="tiny", epochs=3, batch_size=8, lr=1e-3, progress=False, cpu=True, seed=3)
    straight = fit(synthetic_dataset, out_dir=str(tmp_path / "straight"), **kwargs)

    def stop_in_epoch_3(fraction, message):
        if fraction > 2.05 / 3:
            raise Interrupt(message)

    with pytest.raises(Interrupt):
        fit(synthetic_dataset, out_dir=str(tmp_path / "resumed"), progress_callback=stop_in_epoch_3, **kwargs)
    state = json.loads((tmp_path / "resumed" / "last" / "training_state.json").read_text())
    assert state["epoch"] == 1  # epochs 1 and 2 were saved, epoch 3 was cut short
    resumed = fit(synthetic_dataset, out_dir=str(tmp_path / "resumed"), **kwargs)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise equal on the CPU
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-6)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_train_one_model(synthetic_dataset, tmp_path, dataset_name):
    ds = synthetic_dataset.clone(dataset_name)
    ds.persistent = True  # the two worker processes load it by name
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29531",
         str(REPO / "tests" / "ddp_train_script.py"), dataset_name, str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too, not only torchrun
        stdout, stderr = proc.communicate()
        pytest.fail("2-process training did not finish in 300 s:\n" + stdout[-3000:] + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text().strip() == "2"
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(h["val_iou"] is not None for h in history)
    assert "x2" in stdout
