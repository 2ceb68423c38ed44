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

from PIL import Image

from fiftyone_grounding.engine.config import TrainConfig
from fiftyone_grounding.data.records import read_records
from fiftyone_grounding.data.batching import Collator
from fiftyone_grounding.data.datasets import GroundingDataset
from fiftyone_grounding.errors import TrainingError
from fiftyone_grounding.models.build import build_model, build_tokenizer
from fiftyone_grounding.engine.loop import train_step
from fiftyone_grounding.engine.optim import configure_optimizer, cosine_with_warmup
from fiftyone_grounding.engine.fit import fit

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


def _rank_batches(view, batch_size: int, rank: int, world: int, epoch: int = 0) -> list[list[str]]:
    """The images of each of ``rank``'s training batches in ``epoch``, as fit packs them."""
    from fiftyone_grounding.data.batching import GroupBatchSampler

    records = read_records(view.match({"split": "train"}))
    items = GroundingDataset(records, 64, (0.5,) * 3, (0.25,) * 3)
    sampler = GroupBatchSampler(items.group_sizes(), batch_size, shuffle=True, seed=0, num_replicas=world, rank=rank)
    sampler.set_epoch(epoch)
    return [[records.filepaths[items.groups[g][0]] for g in batch] for batch in sampler]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_train_one_model_when_one_gets_a_batch_of_unreadable_images(synthetic_dataset, tmp_path,
                                                                                    dataset_name):
    """Every image of rank 1's first batch is unreadable: it must still take the same optimizer
    and scheduler steps as rank 0 (a stand-in step that learns nothing), or the two deadlock in
    the gradient all-reduce or drift apart. They end with equal weights, in time."""
    ds = synthetic_dataset.clone(dataset_name)
    ds.persistent = True  # the two worker processes load it by name
    broken = _rank_batches(ds, 8, rank=1, world=2)[0]
    for i, path in enumerate(broken):
        bad = tmp_path / f"broken{i}.png"
        bad.write_bytes(b"not a PNG")
        view = ds.match({"filepath": path})
        view.set_values("filepath", [str(bad)] * len(view))
    assert _rank_batches(ds, 8, rank=1, world=2)[0] == [str(tmp_path / f"broken{i}.png") for i in range(len(broken))]
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
    assert (tmp_path / "rank0.txt").read_text().split() == (tmp_path / "rank1.txt").read_text().split()
    world, scheduler_steps, optimizer_steps = (tmp_path / "rank0.txt").read_text().split()
    steps = 2 * len(_rank_batches(ds, 8, rank=0, world=2))  # 2 epochs, every batch a step, in both processes
    assert world == "2" and int(scheduler_steps) == int(optimizer_steps) == steps
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    assert len(history) == 2 and all(h["val_iou"] is not None for h in history)
    assert "x2" in stdout and "image" in stdout  # the skipped images are reported


def test_a_run_folder_resumes_only_its_own_run(synthetic_dataset, tmp_path, capsys):
    """Another dataset view, option or model setting in a folder that holds a run: refused, with
    what differs and the two ways out, and nothing of the run touched. A finished run says so
    and trains nothing; more epochs go on from where it stopped."""
    out = tmp_path / "run"
    kwargs = dict(preset="tiny", batch_size=8, lr=1e-3, progress=False, cpu=True)
    fit(synthetic_dataset, out_dir=str(out), epochs=1, **kwargs)
    saved_config = (out / "train_config.json").read_text()
    weights = (out / "last" / "model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match=r"train\.lr: 0\.001 -> 0\.002.*resume=False.*another out_dir"):
        fit(synthetic_dataset, out_dir=str(out), epochs=2, **{**kwargs, "lr": 2e-3})
    with pytest.raises(TrainingError, match=r"model\.image_size: 64 -> 96"):
        fit(synthetic_dataset, out_dir=str(out), epochs=2, model={"image_size": 96}, **kwargs)
    with pytest.raises(TrainingError, match=r"view: .*Match"):
        fit(synthetic_dataset.match({"split": {"$ne": "test"}}), out_dir=str(out), epochs=2, **kwargs)
    assert (out / "train_config.json").read_text() == saved_config  # nothing written for a refused run
    assert (out / "last" / "model.safetensors").read_bytes() == weights
    capsys.readouterr()
    again = fit(synthetic_dataset, out_dir=str(out), epochs=1, **kwargs)
    assert "Already trained 1 of 1 epochs" in capsys.readouterr().out
    assert len(again.history) == 1 and (out / "last" / "model.safetensors").read_bytes() == weights
    longer = fit(synthetic_dataset, out_dir=str(out), epochs=2, **kwargs)  # the epochs may grow
    assert [h["epoch"] for h in longer.history] == [1, 2]
    # a run folder of the version before the nested model config: its flat config is the same model
    fingerprint = json.loads((out / "run_fingerprint.json").read_text())
    flat = json.loads((Path(__file__).parent / "data" / "checkpoints_v2" / "tiny" / "config.json").read_text())
    flat["loss_weights"]["judge"] = 1.0  # as that version would write today's preset (it predates the term)
    assert flat != fingerprint["model"] and "decoder" in fingerprint["model"]
    (out / "run_fingerprint.json").write_text(json.dumps({**fingerprint, "model": flat}))
    assert [h["epoch"] for h in fit(synthetic_dataset, out_dir=str(out), epochs=3, **kwargs).history] == [1, 2, 3]
    (out / "run_fingerprint.json").unlink()  # a folder of an earlier version: no fingerprint
    with pytest.raises(TrainingError, match="records no fingerprint"):
        fit(synthetic_dataset, out_dir=str(out), epochs=3, **kwargs)
    fresh = fit(synthetic_dataset, out_dir=str(out), epochs=1, resume=False, **kwargs)  # the way out
    assert [h["epoch"] for h in fresh.history] == [1]


def test_learned_tokens_embeddings_and_anchors_get_no_weight_decay():
    model = build_model("tiny-fusion-multi", query_selection=False)
    decay, no_decay = configure_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"reg_token", "query_anchor", "query_content", "level_embed", "type_embed"} <= undecayed
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    assert all(p.dim() >= 2 for p in decay["params"]) and "blocks.0.attn.in_proj_weight" not in undecayed


def test_the_fp16_loss_scale_is_saved_with_last_and_restored(tmp_path):
    """fp16 training (GPUs) scales the loss; its scale and growth tracker are part of where the
    run stands, so last/ keeps them and a resume restores them."""
    from accelerate import Accelerator

    from fiftyone_grounding.engine.state import restore_run, save_last

    model = build_model("tiny")
    optimizer = configure_optimizer(model, 1e-3, 1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(10, 1))
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    accelerator.scaler.scale(torch.ones(()))  # (a scaled loss makes its state)
    accelerator.scaler.update(new_scale=1024.0)  # as after some overflows
    save_last(model, optimizer, scheduler, accelerator, tmp_path / "last", 0, [], 0.5)
    other = Accelerator(cpu=True)
    other.scaler = torch.amp.GradScaler("cpu")
    restore_run(tmp_path / "last", build_model("tiny"), configure_optimizer(model, 1e-3, 1e-4), scheduler, other,
                is_main=False)
    assert other.scaler.get_scale() == 1024.0
    assert other.scaler.state_dict() == accelerator.scaler.state_dict()


def test_absent_pairs_show_phrases_with_images_that_lack_their_referent(synthetic_dataset):
    """A share of a batch's phrases comes again with another image of the batch, never one that
    holds an object of the kind the phrase names; the added rows have no box. Without the
    image's kinds, the kinds of the image's own phrases stand in."""
    import numpy as np

    from fiftyone_grounding.data.absent import add_absent_pairs

    records = read_records(synthetic_dataset.match({"split": "train"}).limit(24))
    assert all(records.image_kinds) and all(records.categories)  # the synthetic set says what each image holds
    model_cfg = build_model("tiny").config
    items = GroundingDataset(records, 64, (0.5,) * 3, (0.25,) * 3)
    batch = Collator(build_tokenizer(model_cfg), 16)([items[i] for i in range(len(items))])
    b = len(batch["phrases"])
    paired = add_absent_pairs(batch, 0.5, np.random.default_rng(0))
    added = len(paired["phrases"]) - b
    assert 0 < added <= round(0.5 * b)
    assert paired["absent"].tolist() == [False] * b + [True] * added
    assert torch.isnan(paired["boxes"][b:]).all() and torch.equal(paired["boxes"][:b], batch["boxes"])
    for key in ("input_ids", "attention_mask"):
        assert paired[key].shape[0] == b + added
    for row in range(b, b + added):
        source = paired["phrases"].index(paired["phrases"][row])  # the phrase's own row
        assert torch.equal(paired["input_ids"][row], paired["input_ids"][source])
        image = int(paired["image_index"][row])
        assert image != int(batch["image_index"][source])
        assert batch["categories"][source] not in batch["image_kinds"][image]
    assert add_absent_pairs(batch, 0.0, np.random.default_rng(0)) is batch
    # without image_kinds (RefCOCO as imported): the kinds of the image's own phrases
    unknown = {**batch, "image_kinds": [None] * len(batch["image_kinds"])}
    paired = add_absent_pairs(unknown, 1.0, np.random.default_rng(1))
    for row in range(b, len(paired["phrases"])):
        source = paired["phrases"].index(paired["phrases"][row])
        image = int(paired["image_index"][row])
        own = {batch["categories"][r] for r in range(b) if int(batch["image_index"][r]) == image}
        assert batch["categories"][source] not in own


def test_absent_pairs_teach_the_confidence_that_the_object_is_missing(synthetic_dataset, tmp_path):
    """fit's step on batches with absent pairs: the confidence of a phrase on an image without its
    referent falls well below that of the phrase on its own image (pairs drawn anew to test);
    fit uses the pairs by default (one-box models with quality and presence heads)."""
    import numpy as np

    from fiftyone_grounding.data.absent import add_absent_pairs
    from fiftyone_grounding.engine.loop import forward_batch, learns_absence

    torch.manual_seed(0)
    records = read_records(synthetic_dataset.match({"split": "train"}).limit(16))
    model = build_model("tiny")
    cfg = model.config
    model.init_box_bias(torch.tensor(records.boxes).mean(0))
    items = GroundingDataset(records, cfg.image_size, cfg.image_mean, cfg.image_std)
    batch = Collator(build_tokenizer(cfg), cfg.max_text_len)([items[i] for i in range(len(items))])
    optimizer = configure_optimizer(model, lr=3e-3, weight_decay=1e-4)
    model.train()
    for step in range(160):
        train_step(model, add_absent_pairs(batch, 0.5, np.random.default_rng(step)), optimizer, cfg.loss_weights,
                   grad_clip=1.0)
    model.eval()
    paired = add_absent_pairs(batch, 1.0, np.random.default_rng(999))
    with torch.no_grad():
        confidence = forward_batch(model, paired).confidence_logits().sigmoid()  # P(present) x predicted IoU
    own, absent = confidence[~paired["absent"]].mean(), confidence[paired["absent"]].mean()
    assert absent < own - 0.1, (own, absent)
    assert learns_absence(cfg) and TrainConfig().negative_share > 0
    assert not learns_absence(build_model("tiny-fusion-multi").config)  # (its existence score learns absence)
    # fit passes the share on: with it, the same run ends elsewhere
    runs = [fit(synthetic_dataset, preset="tiny", out_dir=str(tmp_path / str(share)), epochs=1, batch_size=16,
                negative_share=share, val_split=None, progress=False, cpu=True).model for share in (0.0, 0.5)]
    assert not torch.equal(runs[0].quality_head.fc2.weight, runs[1].quality_head.fc2.weight)


def test_phrases_with_more_boxes_than_queries_are_counted_and_warned(dataset_name, tmp_path, capsys):
    import fiftyone as fo

    from fiftyone_grounding.data.labels import make_box_detections

    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    many = [[0.05 * i, 0.1, 0.05 * i + 0.04, 0.2] for i in range(12)]
    ds = fo.Dataset(dataset_name)
    ds.add_samples([fo.Sample(filepath=str(image), expression=p, ground_truth=make_box_detections(b, p), split="train")
                    for p, b in (("all the dots", many), ("the first dot", many[:1]))])
    records = read_records(ds, several=True, max_boxes=10)
    assert records.over_capacity == 1 and len(records) == 2
    fit(ds, preset="tiny-fusion-multi", out_dir=str(tmp_path / "run"), epochs=1, batch_size=4, val_split=None,
        progress=False, cpu=True)
    assert "1 phrases have more true boxes than the model's 10 box queries" in capsys.readouterr().out


def test_a_multi_box_run_keeps_the_epoch_of_the_best_validation_pr_f1(dataset_name, tmp_path):
    """gRefCOCO ranks by Pr@(F1=1): best/ is the epoch where the official scorer, on the validation
    split, counts the most phrases right (phrases of nothing included); val IoU stays a column."""
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset
    from fiftyone_grounding.engine.state import selection_score

    ds = make_synthetic_dataset(dataset_name, num_images=40, out_dir=str(tmp_path / "images"), seed=3,
                                several_fraction=0.4, none_fraction=0.3, persistent=False, progress=False)
    result = fit(ds, preset="tiny-fusion-multi", out_dir=str(tmp_path / "run"), epochs=3, batch_size=16, lr=1e-3,
                 progress=False, cpu=True)
    scores = [h["val_pr_f1"] for h in result.history]
    assert all(0 <= s <= 1 for s in scores) and all(h["val_iou"] is not None for h in result.history)
    best = json.loads((result.best_dir / "info.json").read_text())
    assert best["epoch"] == 1 + scores.index(max(scores)) and best["val_pr_f1"] == max(scores)
    assert selection_score({"val_pr_f1": 0.2, "val_iou": 0.9}) == 0.2
    assert selection_score({"val_pr_f1": None, "val_iou": 0.9, "train_iou": 0.5}) == 0.9


def test_mixed_precision_and_the_skip_tally_are_one_rule_for_training_and_inference():
    """One autocast (a no-op without a dtype), bf16 only where the device supports it; skipped
    samples counted once each and tallied by reason, as training prints and inference logs them."""
    from fiftyone_grounding.data.skips import count_by_reason, once_each
    from fiftyone_grounding.models.precision import AUTOCAST_DTYPES, autocast, default_mixed_precision

    cpu = torch.device("cpu")
    assert default_mixed_precision(cpu) == "no" and AUTOCAST_DTYPES["no"] is None
    with autocast(cpu, AUTOCAST_DTYPES["bf16"]):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    skipped = once_each([("a", "unreadable"), ("b", "no phrase"), ("a", "unreadable"), ("c", "unreadable")])
    assert skipped == [("a", "unreadable"), ("b", "no phrase"), ("c", "unreadable")]
    assert count_by_reason(skipped) == "2 x unreadable, 1 x no phrase"
