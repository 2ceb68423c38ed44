"""Training: one ``fit()`` that the CLI, the operators and the tests all call.

AdamW + cosine schedule with linear warm-up, gradient clipping, bf16 autocast where the
device supports it, run under HF Accelerate so that ``torchrun``/``accelerate launch``
on several GPUs or nodes needs no code change. Each epoch prints the seed's table row
(train loss, train IoU, val loss, val IoU), writes ``metrics.json`` and ``curves.png``,
saves ``last/`` (with optimizer state, for resume) and ``best/`` (by val IoU).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from .boxes import box_iou
from .checkpoint import (WEIGHTS_NAME, CheckpointError, load_trainable_weights,
                         resolve_checkpoint_dir, save_checkpoint)
from .config import GrounderConfig, get_config
from .data import Collator, GroundingDataset, GroupBatchSampler, default_num_workers, read_records
from .model import Grounder, box_loss, build_model, build_tokenizer

logger = logging.getLogger(__name__)

STATE_JSON = "training_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


@dataclass
class FitResult:
    out_dir: Path
    best_dir: Path
    last_dir: Path
    history: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model: Optional[Grounder] = None  # the model as training left it (this process's copy)

    @property
    def best_val_iou(self) -> Optional[float]:
        vals = [h["val_iou"] for h in self.history if h.get("val_iou") is not None]
        return max(vals) if vals else None


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no decay on biases, norms and the [REG] token.
    Fused (one kernel for all parameters) when they are on a GPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "reg_token" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state as (tensors for safetensors, JSON-able rest): no pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _split_view(view, split_field: str, split: Optional[str]):
    from fiftyone import ViewField as F

    if split is None:
        return None
    if not view.has_field(split_field):
        raise ValueError(f"The dataset has no split field {split_field!r}; pass split_field=... or add one")
    return view.match(F(split_field) == split)


def default_mixed_precision(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def fit(
    view,
    preset: str = "tiny",
    out_dir: str = "runs/grounding",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    warmup_frac: float = 0.05,
    grad_clip: float = 1.0,
    phrase_field: str = "expression",
    gt_field: str = "ground_truth",
    split_field: str = "split",
    train_split: Optional[str] = "train",
    val_split: Optional[str] = "val",
    augment: str = "flip",
    num_workers: Optional[int] = None,
    seed: int = 0,
    resume: bool = True,
    mixed_precision: str = "auto",
    cpu: bool = False,
    weights: bool = True,
    config: Optional[GrounderConfig] = None,
    cache_features: bool = True,
    cache_dir: Optional[str] = None,
    progress: bool = True,
    progress_callback: Optional[Callable[[float, str], None]] = None,
    **overrides,
) -> FitResult:
    """Train a grounding model on a FiftyOne dataset or view.

    Samples of ``train_split`` (by ``split_field``) are trained on, ``val_split`` picks
    the best checkpoint; pass ``train_split=None`` to train on the whole view. ``num_workers``
    DataLoader processes load the items (default: 8 on a GPU, 0 on the CPU). ``overrides``
    change the preset's config (e.g. ``image_size=448``). With ``resume=True`` a run that
    finds ``out_dir/last`` continues from it. With ``cache_features`` (default) the frozen
    image features are computed once into an on-disk cache (``cache_dir``, default
    ``$FIFTYONE_GROUNDING_HOME/features``) and reused every epoch; ``augment="crop-flip"``
    needs pixels and trains without it. Returns the paths and per-epoch history.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(out_dir)
    last_dir, best_dir = out / "last", out / "best"
    resume_dir = _resume_dir(last_dir) if resume else None
    resuming = resume_dir is not None
    if resuming:
        config = GrounderConfig.from_json(resume_dir / "config.json")
    config = config or get_config(preset, **overrides)

    probe = torch.device("cpu") if cpu or not torch.cuda.is_available() else torch.device("cuda")
    mp = default_mixed_precision(probe) if mixed_precision == "auto" else mixed_precision
    accelerator = Accelerator(cpu=cpu, mixed_precision=mp)
    is_main = accelerator.is_main_process
    set_seed(seed)

    train_view = _split_view(view, split_field, train_split) if train_split else view
    val_view = _split_view(view, split_field, val_split) if val_split else None
    train_records = read_records(train_view, phrase_field, gt_field)
    if len(train_records) == 0:
        raise ValueError(f"No trainable samples in the {train_split or 'whole'} split: {train_records.skipped[:5]}")
    val_records = read_records(val_view, phrase_field, gt_field) if val_view is not None else None
    if val_records is not None and len(val_records) == 0:
        val_records = None
    skipped = list(train_records.skipped) + (list(val_records.skipped) if val_records else [])

    if num_workers is None:
        num_workers = default_num_workers(accelerator.device)
    model = build_model(config=config, weights=weights)
    if not resuming:
        model.init_box_bias(torch.tensor(train_records.boxes).mean(0))
    feature_cache = None
    if cache_features and augment != "crop-flip":
        feature_cache = _build_feature_cache(model, config, accelerator, mp, cache_dir,
                                             train_records.filepaths + (val_records.filepaths if val_records else []),
                                             num_workers, progress and is_main)
    tokenizer = build_tokenizer(config)
    collate = Collator(tokenizer, config.max_text_len)
    # Phrases cut to the encoder's limit get one warning for the whole run, from here in the main
    # process: the other processes and the DataLoader workers get a collator that has warned.
    collate.tokenize.warned = not is_main
    collate.tokenize(train_records.phrases + (val_records.phrases if val_records else []))
    if feature_cache is not None:
        collate.text_cache = _build_text_cache(
            model, config, tokenizer, collate.tokenize, accelerator, mp, cache_dir,
            _phrases_seen(train_records.phrases, augment) + (val_records.phrases if val_records else []),
            progress and is_main)
    train_set = GroundingDataset(train_records, config.image_size, config.image_mean, config.image_std,
                                 augment=augment, seed=seed, feature_cache=feature_cache)
    # Each process takes its own share of the batches (sharding is ours, not accelerate's:
    # batches hold a varying number of phrases, which its batch-sampler shards assume not).
    world, rank = accelerator.num_processes, accelerator.process_index
    # Batches carry their epoch, so that the workers can live through all epochs (no start-up
    # cost per epoch) and still pick each epoch's augmentation.
    sampler = GroupBatchSampler(train_set.group_sizes(), batch_size, shuffle=True, seed=seed,
                                num_replicas=world, rank=rank, tag_epoch=True)
    loader_kwargs = dict(collate_fn=collate, num_workers=num_workers,
                         pin_memory=accelerator.device.type == "cuda",
                         persistent_workers=num_workers > 0)
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs)
    val_loader = None
    if val_records is not None:
        val_set = GroundingDataset(val_records, config.image_size, config.image_mean, config.image_std,
                                   feature_cache=feature_cache)
        val_sampler = GroupBatchSampler(val_set.group_sizes(), batch_size, shuffle=False,
                                        num_replicas=world, rank=rank, pad=False)
        val_loader = DataLoader(val_set, batch_sampler=val_sampler, **loader_kwargs)

    model.to(accelerator.device)  # before the optimizer, so that AdamW can be fused on a GPU
    optimizer = configure_optimizer(model, lr, weight_decay)
    total_steps = epochs * len(sampler)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, int(warmup_frac * total_steps)))

    start_epoch, history, best_iou = 0, [], -1.0
    if resuming:
        state = json.loads((resume_dir / STATE_JSON).read_text())
        load_trainable_weights(model, resume_dir / WEIGHTS_NAME)
        optimizer.load_state_dict(_optimizer_from_files(load_file(str(resume_dir / OPTIMIZER_NAME)),
                                                        state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        best_iou = state["best_val_iou"]
        if is_main:
            print(f"Resuming from {resume_dir} after epoch {state['epoch'] + 1}")

    model, optimizer = accelerator.prepare(model, optimizer)

    if is_main:
        n_total = accelerator.unwrap_model(model).num_parameters()
        n_train = accelerator.unwrap_model(model).num_parameters(trainable_only=True)
        print(f"Training {config.preset!r} on {len(train_records)} expressions / {len(train_set)} images "
              f"({n_train:,} trainable of {n_total:,} params) on {accelerator.device} "
              f"x{accelerator.num_processes}, mixed precision: {mp}")
        if skipped:
            print(f"Skipped {len(skipped)} samples; first: {skipped[:3]}")
        print(_table_header())

    for epoch in range(start_epoch, epochs):
        # Everything random in an epoch derives from (seed, epoch): a resumed run repeats it.
        set_seed(seed + epoch)
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        t0 = time.time()
        train_stats = _train_one_epoch(model, train_loader, optimizer, scheduler, accelerator, config,
                                       grad_clip, epoch, epochs, progress and is_main, progress_callback)
        skipped.extend(train_stats.pop("skipped"))
        val_stats = evaluate_loss(model, val_loader, accelerator, config) if val_loader is not None else {}
        skipped.extend(val_stats.pop("skipped", []))
        skipped = list(dict.fromkeys(skipped))  # an unreadable image is skipped every epoch: count it once
        row = {"epoch": epoch + 1, **train_stats,
               "val_loss": val_stats.get("loss"), "val_iou": val_stats.get("iou"),
               "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 3)}
        history.append(row)
        score = row["val_iou"] if row["val_iou"] is not None else row["train_iou"]
        if is_main:
            print(_table_row(row))
            unwrapped = accelerator.unwrap_model(model)
            if score > best_iou:
                best_iou = score
                save_checkpoint(unwrapped, best_dir, extra={"epoch": epoch + 1, "val_iou": row["val_iou"]})
            _save_last(unwrapped, optimizer, scheduler, last_dir, epoch, history, best_iou)
            _write_metrics(out, history, best_iou)
        accelerator.wait_for_everyone()
    if is_main:
        _write_metrics(out, history, best_iou)
        if skipped:
            reasons: dict[str, int] = {}
            for _, why in skipped:
                reasons[why] = reasons.get(why, 0) + 1
            print(f"Skipped {len(skipped)} samples: " + ", ".join(f"{n} x {r}" for r, n in reasons.items()))
    accelerator.end_training()
    return FitResult(out_dir=out, best_dir=best_dir, last_dir=last_dir, history=history, skipped=skipped,
                     model=accelerator.unwrap_model(model).eval())


def _resume_dir(last_dir: Path) -> Optional[Path]:
    """The ``last/`` checkpoint to resume from (or the copy that a kill mid-save left), or None."""
    try:
        folder = resolve_checkpoint_dir(last_dir)
    except CheckpointError:
        return None
    return folder if (folder / STATE_JSON).exists() else None


def _build_feature_cache(model: Grounder, config: GrounderConfig, accelerator, mp: str, cache_dir,
                         paths: list[str], num_workers: int, show_progress: bool):
    """Encode every image once into the on-disk cache (main process first, others reuse it)."""
    from .cache import open_feature_cache
    from .encoders import home_dir

    cache = open_feature_cache(cache_dir or home_dir() / "features", config, model.image_encoder)
    with accelerator.main_process_first():
        cache.reload()
        encoder = model.image_encoder.to(accelerator.device)
        added = cache.build(paths, encoder, config, accelerator.device, num_workers=num_workers,
                            autocast_dtype=torch.bfloat16 if mp == "bf16" else None, progress=show_progress)
    if accelerator.is_main_process and added:
        print(f"Cached image features of {added} images in {cache.dir} "
              f"({cache.nbytes_per_image() / 1024:.1f} KiB per image, both views)")
    return cache


def _phrases_seen(phrases: list[str], augment: str) -> list[str]:
    """Every phrase training can feed the text encoder: flips swap left/right in them."""
    from .data import swap_left_right

    return phrases + ([swap_left_right(p) for p in phrases] if augment != "none" else [])


def _build_text_cache(model: Grounder, config: GrounderConfig, tokenizer, tokenize, accelerator, mp: str,
                      cache_dir, phrases: list[str], show_progress: bool):
    """Encode every phrase once into the on-disk text cache (main process first)."""
    from .cache import open_text_cache
    from .encoders import home_dir

    cache = open_text_cache(cache_dir or home_dir() / "features", config, model.text_encoder, tokenizer)
    with accelerator.main_process_first():
        cache.reload()
        model.text_encoder.to(accelerator.device)
        added = cache.build(phrases, model, tokenize, accelerator.device,
                            autocast_dtype=torch.bfloat16 if mp == "bf16" else None, progress=show_progress)
    if accelerator.is_main_process and added:
        print(f"Cached text features of {added} phrases in {cache.dir}")
    return cache


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _forward_batch(model, batch: dict) -> torch.Tensor:
    return model(pixel_values=batch.get("pixel_values"), image_features=batch.get("image_features"),
                 input_ids=batch.get("input_ids"), text_features=batch.get("text_features"),
                 attention_mask=batch["attention_mask"],
                 image_index=batch["image_index"])


SYNC_EVERY = 25  # steps between reads of the loss on the host (each read waits for the GPU)


def _train_one_epoch(model, loader, optimizer, scheduler, accelerator, config: GrounderConfig,
                     grad_clip: float, epoch: int, epochs: int, show_progress: bool,
                     progress_callback) -> dict:
    """One epoch. The loss and IoU stay on the device and are read every ``SYNC_EVERY`` steps
    (and at the end), so the host queues the next steps while the GPU works. A non-finite
    loss is then reported with its exact step and batch."""
    from tqdm.auto import tqdm

    model.train()
    device = accelerator.device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss * n, iou * n, n
    pending: list[tuple[int, torch.Tensor, list]] = []  # (step, loss, sample ids) not yet checked
    skipped: list = []

    def check() -> None:
        if not pending:
            return
        losses = torch.stack([loss for _, loss, _ in pending]).tolist()
        for (step, _, ids), value in zip(pending, losses):
            if not math.isfinite(value):
                raise TrainingError(
                    f"Non-finite loss ({value}) at epoch {epoch + 1}, step {step + 1}; batch samples: "
                    f"{ids[:8]}. The last good checkpoint is kept; lower the learning rate "
                    "or check these samples.")
        pending.clear()

    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not show_progress, leave=False,
               dynamic_ncols=True)
    for step, batch in enumerate(bar):
        skipped.extend(batch["skipped"])
        if "boxes" not in batch:
            if accelerator.num_processes > 1:
                # Every process must join each gradient all-reduce: step with a zero loss.
                accelerator.backward(sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad))
                optimizer.zero_grad(set_to_none=True)
            continue
        batch = _to_device(batch, device)
        with accelerator.autocast():
            pred = _forward_batch(model, batch)
        loss = box_loss(pred, batch["boxes"], config.loss_weights)["loss"]
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            n = pred.shape[0]
            iou = box_iou(pred.detach().float(), batch["boxes"].float()).mean()
            sums[0] += loss.detach().double() * n  # Python numbers go in as kernel arguments:
            sums[1] += iou.double() * n  # no host-to-device copy, no wait
            sums[2] += n
        pending.append((step, loss.detach(), batch["sample_ids"]))
        if len(pending) >= SYNC_EVERY:
            check()
            if show_progress:
                loss_sum, iou_sum, count = sums.tolist()
                bar.set_postfix(loss=f"{loss_sum / count:.4f}", iou=f"{iou_sum / count:.3f}", refresh=False)
        if progress_callback is not None and step % 10 == 0:
            progress_callback((epoch + (step + 1) / max(1, len(loader))) / epochs,
                              f"epoch {epoch + 1}/{epochs}, step {step + 1}/{len(loader)}")
    check()
    loss_sum, iou_sum, count = accelerator.reduce(sums, "sum").tolist()
    return {"train_loss": loss_sum / max(count, 1), "train_iou": iou_sum / max(count, 1), "skipped": skipped}


@torch.no_grad()
def evaluate_loss(model, loader, accelerator, config: GrounderConfig) -> dict:
    """Mean loss and IoU over a loader (all processes together), and the samples it skipped."""
    # The bare module: no DDP collectives, so processes may hold different numbers of batches.
    module = accelerator.unwrap_model(model)
    module.eval()
    loss_sum = iou_sum = count = 0.0
    skipped: list = []
    for batch in loader:
        skipped.extend(batch["skipped"])
        if "boxes" not in batch:
            continue
        batch = _to_device(batch, accelerator.device)
        with accelerator.autocast():
            pred = _forward_batch(module, batch)
        n = pred.shape[0]
        loss_sum += box_loss(pred, batch["boxes"], config.loss_weights)["loss"].item() * n
        iou_sum += box_iou(pred.float(), batch["boxes"].float()).sum().item()
        count += n
    totals = accelerator.reduce(torch.tensor([loss_sum, iou_sum, count], device=accelerator.device), "sum")
    loss_sum, iou_sum, count = totals.tolist()
    if not count:
        return {"skipped": skipped}
    return {"loss": loss_sum / count, "iou": iou_sum / count, "skipped": skipped}


def _save_last(model: Grounder, optimizer, scheduler, last_dir: Path, epoch: int, history: list,
               best_iou: float) -> None:
    tensors, meta = _optimizer_to_files(optimizer)
    state = {"epoch": epoch, "history": history, "best_val_iou": best_iou, "optimizer": meta,
             "scheduler": scheduler.state_dict()}

    def write_state(tmp: Path) -> None:
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2, default=float))

    save_checkpoint(model, last_dir, write_more=write_state)


def _table_header() -> str:
    return f"{'epoch':>5} | {'train loss':>10} | {'train IoU':>9} | {'val loss':>9} | {'val IoU':>8} | {'lr':>9} | {'s':>6}"


def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def _table_row(r: dict) -> str:
    return (f"{r['epoch']:>5} | {_fmt(r['train_loss'], '10.4f')} | {_fmt(r['train_iou'], '9.4f')} | "
            f"{_fmt(r['val_loss'], '>9.4f')} | {_fmt(r['val_iou'], '>8.4f')} | {r['lr']:>9.2e} | {r['seconds']:>6.1f}")


def _write_metrics(out: Path, history: list[dict], best_iou: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps({"history": history, "best_score": best_iou}, indent=2))
    os.replace(tmp, out / "metrics.json")
    if history:
        plot_curves(history, out / "curves.png")


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and IoU per epoch, train and val, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "iou", "mean IoU")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
        val = [h[f"val_{key}"] for h in history]
        if any(v is not None for v in val):
            ax.plot(epochs, [v if v is not None else float("nan") for v in val], marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
