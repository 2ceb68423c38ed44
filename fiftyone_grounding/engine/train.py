"""Training: one ``fit()`` that the CLI, the operators, the benchmarks and the tests all call.

AdamW + cosine schedule with linear warm-up, gradient clipping, bf16 autocast where the
device supports it, run under HF Accelerate so that ``torchrun``/``accelerate launch``
on several GPUs or nodes needs no code change. Its options and their defaults are
``engine.config.TrainConfig``, saved as ``train_config.json`` in the run's folder. Each epoch prints
the seed's table row (train loss, train IoU, val loss, val IoU), writes ``metrics.json`` and
``curves.png``, saves ``last/`` (with optimizer state, for resume) and ``best/`` (by val IoU).

``fit`` is a few named steps: read the splits, build the model, build the loaders (and the
feature caches), build the optimizer, resume, then per epoch :func:`train_one_epoch` (each
step is :func:`train_step`), :func:`evaluate_loss` and the saves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ..data.batching import GroupBatchSampler
from ..models.boxes import box_iou, generalized_box_iou
from ..models.checkpoint import (BEST_DIR, CONFIG_NAME, WEIGHTS_NAME, load_trainable_weights, resolve_checkpoint_dir,
                         save_checkpoint)
from ..models.config import GrounderConfig
from ..data.batching import default_num_workers
from .config import TrainConfig
from ..models.confidence import CALIBRATION_NAME
from ..data.records import Collator, GroundingDataset, GroundingRecords, add_absent_pairs, read_records
from ..errors import CheckpointError, InputError, TrainingError
from ..models.losses import grounding_loss
from ..models.build import Grounder, build_model, build_tokenizer
from ..data.augment import CACHEABLE, parse_augment
from ..data.text import swap_left_right
from ..fiftyone_api import is_collection, root_dataset

logger = logging.getLogger(__name__)

STATE_JSON = "training_state.json"
FINGERPRINT_NAME = "run_fingerprint.json"  # what the run trains on and how: a resume must match it
OPTIMIZER_NAME = "optimizer.safetensors"
TRAIN_CONFIG_NAME = "train_config.json"


@dataclass
class FitResult:
    out_dir: Path
    best_dir: Path
    last_dir: Path
    history: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model: Optional[Grounder] = None  # the model as training left it (this process's copy)
    # this process's scheduler and optimizer steps (equal in every process of a distributed run)
    scheduler_steps: int = 0
    optimizer_steps: int = 0

    @property
    def best_val_iou(self) -> Optional[float]:
        return _best_val_iou(self.history)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# Learned tokens, embeddings and box anchors: no weight decay (decay would pull a [REG] token or
# a level embedding towards zero, and a box anchor, in logit space, towards the image's centre).
NO_DECAY_PARAMETERS = ("reg_token", "query_anchor", "query_content", "level_embed", "type_embed")


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no decay on biases, norms and the parameters of
    ``NO_DECAY_PARAMETERS``. Fused (one kernel for all parameters) when they are on a GPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        learned_token = name.rsplit(".", 1)[-1] in NO_DECAY_PARAMETERS
        (decay if p.dim() >= 2 and not learned_token else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer steps taken so far (AdamW's step count of its parameters)."""
    steps = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    return max(steps, default=0)


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
        return view
    if not view.has_field(split_field):
        raise InputError(f"The dataset has no split field {split_field!r}; pass split_field=... or add one")
    return view.match(F(split_field) == split)


def default_mixed_precision(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


@dataclass
class _Splits:
    """The records to train and validate on, and the samples they left out."""

    train: GroundingRecords
    val: Optional[GroundingRecords]
    skipped: list

    @property
    def filepaths(self) -> list[str]:
        return self.train.filepaths + (self.val.filepaths if self.val else [])

    @property
    def phrases(self) -> list[str]:
        return self.train.phrases + (self.val.phrases if self.val else [])


@dataclass
class _Loaders:
    train: DataLoader
    sampler: GroupBatchSampler
    train_set: GroundingDataset
    val: Optional[DataLoader]


@dataclass
class _RunState:
    """Where a run stands: what a resume restores."""

    start_epoch: int = 0
    history: list = field(default_factory=list)
    best_score: float = -1.0


def fit(
    view,
    config: Union[TrainConfig, dict, None] = None,
    *,
    model_config: Optional[GrounderConfig] = None,
    resume: bool = True,
    cpu: bool = False,
    weights: bool = True,
    progress: bool = True,
    progress_callback: Optional[Callable[[float, str], None]] = None,
    **options,
) -> FitResult:
    """Train a grounding model on a FiftyOne dataset or view.

    ``config`` (a ``TrainConfig`` or a dict of its keys, e.g. a recipe from ``training/``) and
    ``options`` (``TrainConfig`` keys, which win) set the run; everything left out takes
    ``TrainConfig``'s default, and unknown keys are refused by name. Samples of
    ``train_split`` (by ``split_field``) are trained on, ``val_split`` picks the best
    checkpoint; ``train_split=None`` trains on the whole view. ``model={"image_size": 448}``
    changes the preset's model config; ``model_config`` replaces it whole.

    With ``resume=True`` a run that finds ``out_dir/last`` continues from it (its model config
    wins). With ``cache_features`` (default) the frozen image and text features are computed
    once into an on-disk cache and reused every epoch, where the architecture, the augmentation
    (only ``flip`` comes from the cache) and ``cache_budget_gb`` allow; else the images are
    encoded on the fly, once per image of each batch. ``cpu`` trains on the CPU even where a GPU is; ``weights=False``
    uses random encoder weights (timing). Returns the paths and per-epoch history.

    A run on a FiftyOne view is recorded on its dataset as a custom run (``runs.py``: key
    ``train_<run folder>``, with this config, the view, the checkpoint folder, its best val IoU
    and whether it completed or failed).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    cfg = _train_config(config, options)
    out = Path(cfg.resolved_out_dir())
    last_dir, best_dir = out / "last", out / BEST_DIR
    model_config = model_config or cfg.model_config()
    fingerprint = run_fingerprint(view, cfg, model_config)
    resume_dir = _resume_dir(last_dir) if resume else None
    if resume_dir is not None:
        check_same_run(out, fingerprint)  # a run folder resumes only the run it holds

    probe = torch.device("cpu") if cpu or not torch.cuda.is_available() else torch.device("cuda")
    mp = default_mixed_precision(probe) if cfg.mixed_precision == "auto" else cfg.mixed_precision
    # broadcast_buffers=False: the only buffers are the frozen encoders' constants, which every
    # process loads alike; DDP would otherwise send them from rank 0 before every forward
    accelerator = Accelerator(cpu=cpu, mixed_precision=mp,
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    is_main = accelerator.is_main_process
    set_seed(cfg.seed)

    splits = _read_splits(view, cfg, model_config, say=is_main)
    with _recorded(view, cfg, out, best_dir, is_main) as run:
        model = build_model(config=model_config, weights=weights)
        if resume_dir is None:
            model.init_box_bias(torch.tensor(splits.train.mean_box()))
        loaders = _build_loaders(model, splits, cfg, accelerator, mp, progress and is_main)
        model.to(accelerator.device)  # before the optimizer, so that AdamW can be fused on a GPU
        optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay)
        total_steps = cfg.epochs * len(loaders.sampler)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(total_steps, int(cfg.warmup_frac * total_steps)))
        state = (_resume(resume_dir, model, optimizer, scheduler, accelerator, is_main) if resume_dir
                 else _RunState())
        run.history = state.history
        model, optimizer = accelerator.prepare(model, optimizer)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            cfg.to_json(out / TRAIN_CONFIG_NAME)
            (out / FINGERPRINT_NAME).write_text(json.dumps(fingerprint, indent=2, default=str))
            _print_start(accelerator.unwrap_model(model), splits, loaders, accelerator, mp, cfg, state)

        skipped = list(splits.skipped)
        autocast_dtype = AUTOCAST_DTYPES[mp]
        negative_share = cfg.negative_share if learns_absence(model_config) else 0.0
        for epoch in range(state.start_epoch, cfg.epochs):
            # Everything random in an epoch derives from (seed, epoch): a resumed run repeats it.
            set_seed(cfg.seed + epoch)
            loaders.sampler.set_epoch(epoch)
            loaders.train_set.set_epoch(epoch)
            t0 = time.time()
            train_stats = train_one_epoch(model, loaders.train, optimizer, scheduler, accelerator, model_config,
                                          cfg.grad_clip, epoch, cfg.epochs, autocast_dtype, progress and is_main,
                                          progress_callback, negative_share=negative_share, seed=cfg.seed)
            skipped.extend(train_stats.pop("skipped"))
            val_stats = (evaluate_loss(model, loaders.val, accelerator, model_config, autocast_dtype)
                         if loaders.val is not None else {})
            skipped.extend(val_stats.pop("skipped", []))
            skipped = list(dict.fromkeys(skipped))  # an unreadable image is skipped every epoch: count it once
            row = {"epoch": epoch + 1, **train_stats,
                   "val_loss": val_stats.get("loss"), "val_iou": val_stats.get("iou"),
                   **({"val_pr_f1": val_stats.get("pr_f1")} if "pr_f1" in val_stats else {}),
                   "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 3)}
            state.history.append(row)
            if is_main:
                print(_table_row(row))
                _save_epoch(accelerator.unwrap_model(model), optimizer, scheduler, accelerator, out, epoch, row,
                            state)
            accelerator.wait_for_everyone()
        trained = state.start_epoch < cfg.epochs
        if loaders.val is not None and (trained or not (best_dir / CALIBRATION_NAME).exists()):
            _calibrate_best(model, loaders.val, accelerator, model_config, autocast_dtype, best_dir)
        if is_main:
            _write_metrics(out, state.history, state.best_score)
            _print_skipped(skipped)
        accelerator.end_training()
        result = FitResult(out_dir=out, best_dir=best_dir, last_dir=last_dir, history=state.history,
                           skipped=skipped, model=accelerator.unwrap_model(model).eval(),
                           scheduler_steps=scheduler.last_epoch, optimizer_steps=_optimizer_steps(optimizer))
        run.finish(result)
    return result


class _RecordedRun:
    """The record of a training run on its dataset (``runs.py``): ``history`` is the run's
    (filled as the epochs go), :meth:`finish` closes it."""

    def __init__(self, view, key: Optional[str]):
        self.view, self.key = view, key
        self.history: list[dict] = []

    def end(self, error: Optional[str] = None) -> None:
        if self.key is not None:
            from ..runs import record_training_end

            record_training_end(self.view, self.key, _best_val_iou(self.history), len(self.history), error=error)

    def finish(self, result: FitResult) -> None:
        self.history = result.history
        self.end()


@contextlib.contextmanager
def _recorded(view, cfg: TrainConfig, out: Path, best_dir: Path, is_main: bool):
    """Record the run on ``view``'s dataset as running (main process, FiftyOne views only), and
    as failed, with the error, if it stops with one."""
    from ..runs import record_training_start

    key = None
    if is_main and is_collection(view):
        key = record_training_start(view, cfg.to_dict(), out, best_dir)
    run = _RecordedRun(view, key)
    try:
        yield run
    except BaseException as e:
        run.end(error=f"{type(e).__name__}: {e}")
        raise


def _best_val_iou(history: list[dict]) -> Optional[float]:
    vals = [h["val_iou"] for h in history if h.get("val_iou") is not None]
    return max(vals) if vals else None


def _train_config(config, options: dict) -> TrainConfig:
    """``config`` (a TrainConfig, a dict of its keys or None) with ``options`` on top."""
    if isinstance(config, GrounderConfig):
        raise InputError("fit(view, config=...) takes a TrainConfig; pass a model's GrounderConfig as model_config=")
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    return TrainConfig.from_dict({**base, **options})


def _read_splits(view, cfg: TrainConfig, model_config: GrounderConfig, say: bool = True) -> _Splits:
    """The train and val records (multi-box models: with the phrases of no or several boxes, and
    a warning about phrases with more true boxes than the model has queries)."""
    several = model_config.num_queries > 0
    max_boxes = model_config.num_queries if several else None
    train_view = _split_view(view, cfg.split_field, cfg.train_split)
    train = read_records(train_view, cfg.phrase_field, cfg.gt_field, several, max_boxes)
    if len(train) == 0:
        raise InputError(f"No trainable samples in the {cfg.train_split or 'whole'} split"
                         + (f"; the first skipped: {train.skipped[:5]}" if train.skipped else "")
                         + f". Check {cfg.phrase_field!r} and {cfg.gt_field!r}, or pass train_split=")
    val = None
    if cfg.val_split:
        val = read_records(_split_view(view, cfg.split_field, cfg.val_split), cfg.phrase_field, cfg.gt_field,
                           several, max_boxes)
        val = val if len(val) else None
    over = train.over_capacity + (val.over_capacity if val else 0)
    if over and say:
        print(f"Warning: {over} phrases have more true boxes than the model's {max_boxes} box queries; each query "
              f"takes one box, so these phrases can never be found whole (F1 = 1). Give more queries "
              f"(model={{'num_queries': N}}) to cover them.")
    return _Splits(train, val, list(train.skipped) + (list(val.skipped) if val else []))


# What a run's fingerprint leaves out: how long it runs, where it writes and how fast it loads.
UNFINGERPRINTED = ("epochs", "out_dir", "num_workers", "cache_dir")


def run_fingerprint(view, cfg: TrainConfig, model_config: GrounderConfig) -> dict:
    """What a run trains on and how: the dataset and the view's stages, every training option
    but those of ``UNFINGERPRINTED``, the model config. A run folder resumes only the run whose
    fingerprint it holds."""
    dataset = root_dataset(view) if is_collection(view) else None
    stages = []
    if dataset is not None:
        stages = [{k: v for k, v in stage.items() if k != "_uuid"} for stage in view.view()._serialize()]
    train = {k: v for k, v in cfg.to_dict().items() if k not in UNFINGERPRINTED}
    return json.loads(json.dumps({"dataset": dataset.name if dataset is not None else None, "view": stages,
                                  "train": train, "model": model_config.to_dict()}, default=str))


def _differences(old, new, path: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two fingerprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new), key=str)
                for line in _differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def check_same_run(out: Path, fingerprint: dict) -> None:
    """Raise a ``TrainingError`` unless ``out`` holds a run of this very fingerprint (the epochs
    may differ: a run can go on for more)."""
    ways_out = (f"pass resume=False (CLI: --no-resume) to train a new model in {out}, or another out_dir "
                "(CLI: --out-dir)")
    path = out / FINGERPRINT_NAME
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise TrainingError(f"{out} holds a run that cannot be resumed safely: it records no fingerprint of its "
                            f"dataset and options ({path.name}; made by an earlier version). To keep it, {ways_out}."
                            ) from None
    differs = _differences(saved, fingerprint)
    if differs:
        shown = "; ".join(differs[:6]) + (f"; and {len(differs) - 6} more" if len(differs) > 6 else "")
        raise TrainingError(f"{out} holds another run (it differs in {shown}), so it is not resumed: {ways_out}.")


def learns_absence(config: GrounderConfig) -> bool:
    """Whether training shows phrases with images that lack their referent (``negative_share``):
    one-box models with a quality head (its target there is 0) and a presence head, whose
    confidence then says whether the object is there at all. (Multi-box models learn it from
    phrases of nothing, through their existence score.)"""
    return config.num_queries == 0 and config.quality_head and config.presence_head


def _build_loaders(model: Grounder, splits: _Splits, cfg: TrainConfig, accelerator, mp: str,
                   show_progress: bool) -> _Loaders:
    """The train and val DataLoaders, over the feature caches when they can be used."""
    config = model.config
    is_main = accelerator.is_main_process
    num_workers = default_num_workers(accelerator.device) if cfg.num_workers is None else cfg.num_workers
    feature_cache = None
    if cfg.cache_features and _cache_fits(model, cfg, len(set(splits.filepaths)), is_main):
        feature_cache = _build_feature_cache(model, accelerator, mp, cfg.cache_dir, splits.filepaths, num_workers,
                                             show_progress)
    tokenizer = build_tokenizer(config)
    collate = Collator(tokenizer, config.max_text_len)
    # Phrases cut to the encoder's limit get one warning for the whole run, from here in the main
    # process: the other processes and the DataLoader workers get a collator that has warned.
    collate.tokenize.warned = not is_main
    collate.tokenize(splits.phrases)
    if feature_cache is not None:
        val_phrases = splits.val.phrases if splits.val else []
        collate.text_cache = _build_text_cache(model, tokenizer, collate.tokenize, accelerator, mp, cfg.cache_dir,
                                               _phrases_seen(splits.train.phrases, cfg.augment) + val_phrases,
                                               show_progress)
    train_set = GroundingDataset(splits.train, config.image_size, config.image_mean, config.image_std,
                                 augment=cfg.augment, seed=cfg.seed, feature_cache=feature_cache)
    # Each process takes its own share of the batches (sharding is ours, not accelerate's:
    # batches hold a varying number of phrases, which its batch-sampler shards assume not).
    world, rank = accelerator.num_processes, accelerator.process_index
    # Batches carry their epoch, so that the workers can live through all epochs (no start-up
    # cost per epoch) and still pick each epoch's augmentation.
    sampler = GroupBatchSampler(train_set.group_sizes(), cfg.batch_size, shuffle=True, seed=cfg.seed,
                                num_replicas=world, rank=rank, tag_epoch=True)
    loader_kwargs = dict(collate_fn=collate, num_workers=num_workers,
                         pin_memory=accelerator.device.type == "cuda",
                         persistent_workers=num_workers > 0)
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs)
    val_loader = None
    if splits.val is not None:
        val_set = GroundingDataset(splits.val, config.image_size, config.image_mean, config.image_std,
                                   feature_cache=feature_cache)
        val_sampler = GroupBatchSampler(val_set.group_sizes(), cfg.batch_size, shuffle=False,
                                        num_replicas=world, rank=rank, pad=False)
        val_loader = DataLoader(val_set, batch_sampler=val_sampler, **loader_kwargs)
    return _Loaders(train_loader, sampler, train_set, val_loader)


def _resume(resume_dir: Path, model: Grounder, optimizer, scheduler, accelerator, is_main: bool) -> _RunState:
    """Load the weights, optimizer, scheduler and fp16 loss scale of ``last/``; the epochs done and
    their history."""
    state = json.loads((resume_dir / STATE_JSON).read_text())
    load_trainable_weights(model, resume_dir / WEIGHTS_NAME)
    optimizer.load_state_dict(_optimizer_from_files(load_file(str(resume_dir / OPTIMIZER_NAME)),
                                                    state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if state.get("grad_scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    if is_main:
        print(f"Resuming from {resume_dir} after epoch {state['epoch'] + 1}")
    return _RunState(start_epoch=state["epoch"] + 1, history=state["history"], best_score=state["best_val_iou"])


def _print_start(model: Grounder, splits: _Splits, loaders: _Loaders, accelerator, mp: str, cfg: TrainConfig,
                 state: _RunState) -> None:
    if state.start_epoch >= cfg.epochs:
        print(f"Already trained {state.start_epoch} of {cfg.epochs} epochs in {cfg.resolved_out_dir()}: nothing to "
              "train. Give more epochs to go on, or resume=False (CLI: --no-resume) to train a new model there.")
        return
    n_total, n_train = model.num_parameters(), model.num_parameters(trainable_only=True)
    print(f"Training {model.config.preset!r} on {len(splits.train)} expressions / {len(loaders.train_set)} images "
          f"({n_train:,} trainable of {n_total:,} params) on {accelerator.device} "
          f"x{accelerator.num_processes}, mixed precision: {mp}")
    if splits.skipped:
        print(f"Skipped {len(splits.skipped)} samples; first: {splits.skipped[:3]}")
    print(_table_header())


def _save_epoch(model: Grounder, optimizer, scheduler, accelerator, out: Path, epoch: int, row: dict,
                state: _RunState) -> None:
    """``best/`` when the epoch's score is the best so far: a multi-box model's validation
    Pr@F1=1 (what gRefCOCO ranks by), else the val IoU (the train IoU without a val split);
    always ``last/`` (with the optimizer, for resume) and ``metrics.json``."""
    score = selection_score(row)
    if score > state.best_score:
        state.best_score = score
        save_checkpoint(model, out / BEST_DIR, extra={"epoch": epoch + 1, "val_iou": row["val_iou"],
                                                       **({"val_pr_f1": row["val_pr_f1"]} if "val_pr_f1" in row else {})})
    _save_last(model, optimizer, scheduler, accelerator, out / "last", epoch, state.history, state.best_score)
    _write_metrics(out, state.history, state.best_score)


def selection_score(row: dict) -> float:
    """What ``best/`` is chosen by: the validation Pr@F1=1 where the epoch has one (multi-box
    models), else the val IoU, else the train IoU."""
    for key in ("val_pr_f1", "val_iou", "train_iou"):
        if row.get(key) is not None:
            return row[key]
    return -1.0


def _calibrate_best(model, val_loader, accelerator, config: GrounderConfig, autocast_dtype, best_dir: Path) -> None:
    """Fit the confidence's calibration of ``best/`` on the validation split and save it there
    (models whose boxes carry a confidence). The model in memory keeps the weights training left it with."""
    from accelerate.utils import gather_object

    from ..models.confidence import fit_calibration

    module = accelerator.unwrap_model(model)
    if not module.has_confidence:
        return
    kept = {k: v.detach().clone() for k, v in module.trainable_state_dict().items()}
    load_trainable_weights(module, best_dir / WEIGHTS_NAME)
    try:
        logits, ious, images = evaluate_loss(model, val_loader, accelerator, config, autocast_dtype,
                                             keep_quality=True)["quality"]
    finally:
        module.load_state_dict(kept, strict=False)
    if accelerator.num_processes > 1:
        logits, ious, images = (sum(gather_object([values]), []) for values in (logits, ious, images))
    if accelerator.is_main_process and logits:
        calibration = fit_calibration(logits, ious, groups=images)
        calibration.save(best_dir)
        module.calibration = calibration
        what = "validation boxes (every query's)" if config.num_queries else "validation expressions"
        print(f"Confidence: {calibration.method} calibration on {calibration.fitted_on} {what} "
              f"(expected calibration error there {calibration.val_ece:.4f})")
    accelerator.wait_for_everyone()


def _print_skipped(skipped: list) -> None:
    if skipped:
        reasons: dict[str, int] = {}
        for _, why in skipped:
            reasons[why] = reasons.get(why, 0) + 1
        print(f"Skipped {len(skipped)} samples: " + ", ".join(f"{n} x {r}" for r, n in reasons.items()))


def _resume_dir(last_dir: Path) -> Optional[Path]:
    """The ``last/`` checkpoint to resume from (or the copy that a kill mid-save left), or None."""
    try:
        folder = resolve_checkpoint_dir(last_dir)
    except CheckpointError:
        return None
    return folder if (folder / STATE_JSON).exists() else None


def _build_feature_cache(model: Grounder, accelerator, mp: str, cache_dir, paths: list[str], num_workers: int,
                         show_progress: bool):
    """Encode every image once into the on-disk cache (main process first, others reuse it)."""
    from ..data.cache import open_feature_cache
    from ..models.encoders import home_dir

    cache = open_feature_cache(cache_dir or home_dir() / "features", model)
    with accelerator.main_process_first():
        cache.reload()
        model.image_encoder.to(accelerator.device)
        added = cache.build(paths, model.encode_images, model.config, accelerator.device, num_workers=num_workers,
                            autocast_dtype=AUTOCAST_DTYPES[mp], progress=show_progress)
    if accelerator.is_main_process and added:
        print(f"Cached image features of {added} images in {cache.dir} "
              f"({cache.nbytes_per_image() / 1024:.1f} KiB per image, both views)")
    return cache


def _phrases_seen(phrases: list[str], augment: str) -> list[str]:
    """Every phrase training can feed the text encoder: flips swap left/right in them."""
    return phrases + ([swap_left_right(p) for p in phrases] if "flip" in parse_augment(augment) else [])


def _cache_fits(model: Grounder, cfg: TrainConfig, num_images: int, say: bool) -> bool:
    """Whether the image features of this run can be cached: the architecture's are
    text-independent, the augmentation needs no pixels, and they fit ``cache_budget_gb``."""
    from ..data.cache import VIEWS

    def note(message: str) -> bool:
        if say:
            print(f"Feature cache off: {message}; the images are encoded on the fly, once per image of each batch")
        return False

    if not model.cacheable:
        return note(f"the {model.config.architecture} architecture reads the phrase inside the image encoder")
    if not parse_augment(cfg.augment) <= CACHEABLE:
        return note(f"augment={cfg.augment!r} needs pixels (only flip comes from the cache)")
    tokens, width = model.image_feature_shape()
    per_image = tokens * width * 2 * len(VIEWS)  # float16, both views
    if per_image * num_images > cfg.cache_budget_gb * 2**30:
        return note(f"{num_images:,} images x {per_image / 2**20:.1f} MiB ({tokens} tokens x {width}, float16, 2 views) "
                    f"= {per_image * num_images / 2**30:.1f} GiB is over cache_budget_gb={cfg.cache_budget_gb:g}")
    return True


def _build_text_cache(model: Grounder, tokenizer, tokenize, accelerator, mp: str, cache_dir, phrases: list[str],
                      show_progress: bool):
    """Encode every phrase once into the on-disk text cache (main process first)."""
    from ..data.cache import open_text_cache
    from ..models.encoders import home_dir

    cache = open_text_cache(cache_dir or home_dir() / "features", model.config, model.text_encoder, tokenizer)
    with accelerator.main_process_first():
        cache.reload()
        model.text_encoder.to(accelerator.device)
        added = cache.build(phrases, model, tokenize, accelerator.device, autocast_dtype=AUTOCAST_DTYPES[mp],
                            progress=show_progress)
    if accelerator.is_main_process and added:
        print(f"Cached text features of {added} phrases in {cache.dir}")
    return cache


def to_device(batch: dict, device: torch.device) -> dict:
    def move(v):
        if torch.is_tensor(v):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and torch.is_tensor(v[0]):  # targets: a tensor per phrase
            return [t.to(device, non_blocking=True) for t in v]
        return v

    return {k: move(v) for k, v in batch.items()}


def loss_target(batch: dict):
    """What ``grounding_loss`` compares with: every phrase's boxes where the batch has them
    (multi-box training), else the one box of each."""
    return batch["targets"] if "targets" in batch else batch["boxes"]


def _iou_with_first_box(pred: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(IoU sum, count) of each phrase's predicted box with its first true box, over the phrases
    that have one (a no-target phrase's first box is NaN)."""
    has = torch.isfinite(boxes).all(-1)
    iou = box_iou(pred.float(), torch.nan_to_num(boxes.float()))
    return (iou * has).sum(), has.sum()


def matched_queries(query_boxes: torch.Tensor, truths) -> torch.Tensor:
    """(B, Q) 1.0 where a query's box is matched to one of its phrase's true boxes as gRefCOCO's
    scorer matches (``grec.greedy_matches``: GIoU >= 0.5, each box once), else 0.0: what a
    multi-box model's confidence is calibrated to."""
    from ..evaluation.grec import greedy_matches

    flags = torch.zeros(query_boxes.shape[:2])
    for b, truth in enumerate(truths):
        if len(truth):
            boxes = query_boxes[b].detach().float().cpu()
            giou = generalized_box_iou(boxes[:, None], truth.float().cpu()[None]).numpy()  # (Q, n)
            for i, _ in greedy_matches(giou):
                flags[b, i] = 1.0
    return flags


def forward_batch(model, batch: dict):
    """The model's ``GroundingOutput`` for a collated training batch (pixels or cached features)."""
    return model(pixel_values=batch.get("pixel_values"), image_features=batch.get("image_features"),
                 input_ids=batch.get("input_ids"), text_features=batch.get("text_features"),
                 attention_mask=batch["attention_mask"],
                 image_index=batch["image_index"])


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_step(model, batch: dict, optimizer, loss_weights: dict, grad_clip: float = 0.0, *, scheduler=None,
               accelerator=None, autocast_dtype: Optional[torch.dtype] = None,
               loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch already on the model's device: forward (under autocast
    with ``autocast_dtype``), ``grounding_loss``, backward, gradient clipping (``clip_groups``),
    optimizer and scheduler step. Under Accelerate (``accelerator``) backward and clipping go through it.
    ``loss_scale`` 0: a step that must happen but must not learn (a process whose own batch was
    empty, see :func:`train_one_epoch`). Returns the loss and the predicted boxes (clipped to
    the image; the batch's own phrases, not the rows of ``absent`` pairs), detached, still on the
    device (reading them waits for it)."""
    with _autocast(batch["attention_mask"].device, autocast_dtype):
        out = forward_batch(model, batch)
    loss = grounding_loss(out, loss_target(batch), loss_weights, absent=batch.get("absent"))["loss"]
    if loss_scale != 1.0:
        loss = loss * loss_scale
    optimizer.zero_grad(set_to_none=True)
    if accelerator is not None:
        accelerator.backward(loss)
    else:
        loss.backward()
    if grad_clip:
        if accelerator is not None:
            accelerator.unscale_gradients()  # (fp16 only; a no-op otherwise)
        for group in clip_groups(model):
            torch.nn.utils.clip_grad_norm_(group, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    own = len(batch["sample_ids"]) if "absent" in batch else out.boxes.shape[0]
    return loss.detach(), out.clipped().boxes[:own].detach()


def clip_groups(model) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters in the groups whose gradient norms are clipped apart: the
    quality head learns from its own loss alone, so its gradients must not scale down the box's."""
    main, quality = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (quality if "quality_head." in name else main).append(p)
    return [group for group in (main, quality) if group]


SYNC_EVERY = 25  # steps between reads of the loss on the host (each read waits for the GPU)


def one_phrase_batch(batch: dict) -> dict:
    """The first phrase of a collated batch and its image, copied: a stand-in batch, small and
    valid, that keeps nothing else of the batch alive."""
    image = int(batch["image_index"][0])
    out = {"image_index": torch.zeros(1, dtype=torch.long), "phrases": batch["phrases"][:1],
           "sample_ids": batch["sample_ids"][:1]}
    for key in ("input_ids", "text_features", "attention_mask", "boxes"):
        if key in batch:
            out[key] = batch[key][:1].clone()
    for key in ("pixel_values", "image_features"):
        if key in batch:
            out[key] = batch[key][image:image + 1].clone()
    if "targets" in batch:
        out["targets"] = [batch["targets"][0].clone()]
    return out


def stand_in_batch(loader) -> dict:
    """A one-phrase batch of the first readable item of the loader's dataset (for a process
    whose own batch is empty before it has seen a full one)."""
    for index in range(len(loader.dataset)):
        batch = loader.collate_fn([loader.dataset[index]])
        if "boxes" in batch:
            return one_phrase_batch(batch)
    raise TrainingError("No image of the training split can be read; check the image files")


def train_one_epoch(model, loader, optimizer, scheduler, accelerator, config: GrounderConfig, grad_clip: float,
                    epoch: int, epochs: int, autocast_dtype: Optional[torch.dtype], show_progress: bool,
                    progress_callback, negative_share: float = 0.0, seed: int = 0) -> dict:
    """One epoch of :func:`train_step`. The loss and IoU stay on the device and are read every
    ``SYNC_EVERY`` steps (and at the end), so the host queues the next steps while the GPU
    works. A non-finite loss is then reported with its exact step and batch, by every process
    at once (they stop together).

    Every process takes the same number of optimizer and scheduler steps, whatever its data: a
    process whose batch held only unreadable images steps on a stand-in batch (one phrase of its
    last full batch) with the loss scaled to 0, so that it joins the gradient all-reduce (DDP's
    averaging then gives it the other processes' step); alone, it only moves the schedule on.
    ``negative_share`` > 0: that share of each batch's phrases is also shown with another image
    of the batch that lacks its referent (:func:`data.add_absent_pairs`)."""
    import numpy as np

    from ..progress import bar as progress_bar

    model.train()
    device = accelerator.device
    several = accelerator.num_processes > 1
    sums = torch.zeros(6, device=device, dtype=torch.float64)  # loss * n, iou sum, n, n with a box, crops, crop area
    pending: list[tuple[int, torch.Tensor, list]] = []  # (step, loss, sample ids) not yet checked
    skipped: list = []
    stand_in: Optional[dict] = None  # one phrase of the last full batch

    def check() -> None:
        losses = torch.stack([loss for _, loss, _ in pending]).tolist() if pending else []
        bad = next(((step, ids, value) for (step, _, ids), value in zip(pending, losses)
                    if not math.isfinite(value)), None)
        pending.clear()
        if several:  # all stop, or none: a process that stopped alone would leave the others waiting
            flag = accelerator.reduce(torch.tensor([float(bad is not None)], device=device), "sum")
            if flag.item() and bad is None:
                raise TrainingError(f"Non-finite loss in another process at epoch {epoch + 1}; the last good "
                                    "checkpoint is kept; lower the learning rate or check the data.")
        if bad is not None:
            step, ids, value = bad
            raise TrainingError(
                f"Non-finite loss ({value}) at epoch {epoch + 1}, step {step + 1}; batch samples: "
                f"{ids[:8]}. The last good checkpoint is kept; lower the learning rate "
                "or check these samples.")

    bar = progress_bar(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not show_progress, leave=False)
    for step, batch in enumerate(bar):
        skipped.extend(batch["skipped"])
        if "boxes" in batch:
            if several:
                stand_in = one_phrase_batch(batch)
            if negative_share > 0:
                batch = add_absent_pairs(batch, negative_share, np.random.default_rng([seed, epoch, step]))
            crop_areas = batch.get("crop_areas") or []
            batch = to_device(batch, device)
            loss, pred = train_step(model, batch, optimizer, config.loss_weights, grad_clip, scheduler=scheduler,
                                    accelerator=accelerator, autocast_dtype=autocast_dtype)
            with torch.no_grad():
                n = pred.shape[0]
                iou_sum, with_box = _iou_with_first_box(pred, batch["boxes"][:n])
                sums[0] += loss.double() * n  # Python numbers go in as kernel arguments:
                sums[1] += iou_sum.double()  # no host-to-device copy, no wait
                sums[2] += n
                sums[3] += with_box.double()
                sums[4] += len(crop_areas)
                sums[5] += float(sum(crop_areas))
            pending.append((step, loss, batch["sample_ids"]))
        elif several:  # every image of this process's batch was unreadable: a step that learns nothing
            stand_in = stand_in or stand_in_batch(loader)
            train_step(model, to_device(stand_in, device), optimizer, config.loss_weights, grad_clip,
                       scheduler=scheduler, accelerator=accelerator, autocast_dtype=autocast_dtype, loss_scale=0.0)
        else:
            scheduler.step()  # alone: nothing to learn, the schedule keeps its length
        if (step + 1) % SYNC_EVERY == 0:  # at the same steps in every process (check may talk to the others)
            check()
            if show_progress:
                loss_sum, iou_sum, count, with_box = sums[:4].tolist()
                bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}", iou=f"{iou_sum / max(with_box, 1):.3f}",
                                refresh=False)
        if progress_callback is not None and step % 10 == 0:
            progress_callback((epoch + (step + 1) / max(1, len(loader))) / epochs,
                              f"epoch {epoch + 1}/{epochs}, step {step + 1}/{len(loader)}")
    check()
    loss_sum, iou_sum, count, with_box, crops, crop_area = accelerator.reduce(sums, "sum").tolist()
    stats = {"train_loss": loss_sum / max(count, 1), "train_iou": iou_sum / max(with_box, 1), "skipped": skipped}
    if crops:
        stats["crop_area"] = crop_area / crops  # the mean share of an image a training crop keeps
    return stats


@torch.no_grad()
def evaluate_loss(model, loader, accelerator, config: GrounderConfig, autocast_dtype: Optional[torch.dtype] = None,
                  keep_quality: bool = False) -> dict:
    """Mean loss and IoU over a loader (all processes together), and the samples it skipped.
    Multi-box models also get ``pr_f1``: the share of phrases that gRefCOCO's scorer counts right
    (``grec.score_expression`` at the model's ``score_thresh``, the uncalibrated confidence),
    phrases of nothing included. With ``keep_quality``, also this process's ``(quality logits,
    IoUs, images)`` of every box, for the confidence's calibration."""
    # The bare module: no DDP collectives, so processes may hold different numbers of batches.
    module = accelerator.unwrap_model(model)
    module.eval()
    loss_sum = iou_sum = count = with_box = right = 0.0
    skipped: list = []
    logits, ious, images = [], [], []
    for batch in loader:
        skipped.extend(batch["skipped"])
        if "boxes" not in batch:
            continue
        batch = to_device(batch, accelerator.device)
        with _autocast(accelerator.device, autocast_dtype):
            raw = forward_batch(module, batch)
        out = raw.clipped()  # as post-processing writes them: what the metrics judge
        pred = out.boxes
        n = pred.shape[0]
        loss_sum += grounding_loss(raw, loss_target(batch), config.loss_weights)["loss"].item() * n
        batch_iou, batch_with_box = _iou_with_first_box(pred, batch["boxes"])
        iou_sum += batch_iou.item()
        with_box += batch_with_box.item()
        count += n
        if out.scores is not None:
            right += grec_right(out, loss_target(batch), config.score_thresh)
        image_of = [batch["images"][i] for i in batch["image_index"].tolist()] if keep_quality else []
        if keep_quality and out.scores is not None:  # every query's box: right (1) where it finds a true box
            logits.extend(out.box_confidence_logits().flatten().tolist())
            ious.extend(matched_queries(out.query_boxes, loss_target(batch)).flatten().tolist())
            images.extend(image for image in image_of for _ in range(out.scores.shape[1]))
        elif keep_quality and out.quality is not None:
            logits.extend(out.confidence_logits().tolist())
            ious.extend(box_iou(pred.float(), batch["boxes"].float()).tolist())
            images.extend(image_of)
    totals = accelerator.reduce(torch.tensor([loss_sum, iou_sum, count, with_box, right], device=accelerator.device),
                                "sum")
    loss_sum, iou_sum, count, with_box, right = totals.tolist()
    result = {"skipped": skipped, "quality": (logits, ious, images)} if keep_quality else {"skipped": skipped}
    if count:
        result.update(loss=loss_sum / count, iou=iou_sum / max(with_box, 1))
        if config.num_queries > 0:
            result["pr_f1"] = right / count
    return result


def grec_right(out, truths, score_thresh: float) -> int:
    """How many phrases of a multi-box output (boxes clipped) gRefCOCO's scorer counts right: at
    confidence ``score_thresh``, every true box found at GIoU >= 0.5 and nothing else kept (a
    phrase of nothing: no box kept)."""
    from ..evaluation import grec
    boxes = out.query_boxes.float().cpu().numpy()
    scores = out.box_confidences().float().cpu().numpy()
    return sum(grec.score_expression(grec.Expression.of(b, c, t.float().cpu().numpy()), score_thresh).correct
               for b, c, t in zip(boxes, scores, truths))


def _save_last(model: Grounder, optimizer, scheduler, accelerator, last_dir: Path, epoch: int, history: list,
               best_iou: float) -> None:
    tensors, meta = _optimizer_to_files(optimizer)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None  # fp16's loss scale
    state = {"epoch": epoch, "history": history, "best_val_iou": best_iou, "optimizer": meta,
             "scheduler": scheduler.state_dict(), "grad_scaler": scaler}

    def write_state(tmp: Path) -> None:
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2, default=float))

    save_checkpoint(model, last_dir, write_more=write_state)


def _table_header() -> str:
    return (f"{'epoch':>5} | {'train loss':>10} | {'train IoU':>9} | {'val loss':>9} | {'val IoU':>8} | {'lr':>9} | "
            f"{'s':>6}")


def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


# columns a row shows after its own where the run has them: (key, name)
EXTRA_COLUMNS = (("val_pr_f1", "val Pr@F1=1"), ("crop_area", "crop area"))


def _table_row(r: dict) -> str:
    line = (f"{r['epoch']:>5} | {_fmt(r['train_loss'], '10.4f')} | {_fmt(r['train_iou'], '9.4f')} | "
            f"{_fmt(r['val_loss'], '>9.4f')} | {_fmt(r['val_iou'], '>8.4f')} | {r['lr']:>9.2e} | {r['seconds']:>6.1f}")
    extras = [f"{name} {_fmt(r[key], '.4f')}" for key, name in EXTRA_COLUMNS if key in r]
    return line + ("  (" + ", ".join(extras) + ")" if extras else "")


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
