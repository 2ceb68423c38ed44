"""Training: one ``fit()`` that the CLI, the operators, the benchmarks and the tests all call.

AdamW + cosine schedule with linear warm-up, gradient clipping, bf16 autocast where the
device supports it, run under HF Accelerate so that ``torchrun``/``accelerate launch``
on several GPUs or nodes needs no code change. Its options and their defaults are
``engine.config.TrainConfig``, saved as ``train_config.json`` in the run's folder. Each epoch prints
the seed's table row (train loss, train IoU, val loss, val IoU), writes ``metrics.json`` and
``curves.png``, saves ``last/`` (with optimizer state, for resume) and ``best/`` (by val IoU).

``fit`` is a few named steps: read the splits (``splits.py``), build the model, build the loaders
and the feature caches (``loaders.py``, ``caches.py``), build the optimizer (``optim.py``), resume
(``state.py``), then per epoch ``loop.train_one_epoch`` and ``loop.evaluate_loss``, the table row
and the saves (``report.py``, ``state.py``), and at the end the calibration of ``best/``
(``calibration.py``); the run is recorded on its dataset throughout (``record.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..data.skips import once_each
from ..devices import on_device
from ..errors import InputError
from ..models.build import build_model
from ..models.decoder import Grounder
from ..models.checkpoint import BEST_DIR, save_checkpoint
from ..models.calibration import CALIBRATION_NAME
from ..models.config import GrounderConfig
from ..models.precision import AUTOCAST_DTYPES, default_mixed_precision
from .calibration import calibrate_best
from .config import TrainConfig
from .loaders import build_loaders
from .loop import evaluate_loss, learns_absence, train_one_epoch
from .optim import configure_optimizer, cosine_with_warmup
from .record import recorded
from .report import best_val_iou, print_skipped, print_start, table_row, write_metrics
from .splits import read_splits
from .state import (RunState, check_same_run, optimizer_steps, restore_run, resumable_last, run_fingerprint,
                    save_last, selection_score, write_run_files)


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
        return best_val_iou(self.history)


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
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    cfg = _train_config(config, options)
    out = Path(cfg.resolved_out_dir())
    last_dir, best_dir = out / "last", out / BEST_DIR
    model_config = model_config or cfg.model_config()
    fingerprint = run_fingerprint(view, cfg, model_config)
    resume_dir = resumable_last(last_dir) if resume else None
    if resume_dir is not None:
        check_same_run(out, fingerprint)  # a run folder resumes only the run it holds

    # The device this process trains on, as the Accelerator below will have it (Accelerate's shared
    # state: under torchrun the rank's cuda:LOCAL_RANK, else ACCELERATE_TORCH_DEVICE or the current
    # GPU): its bf16 decides "auto", not GPU 0's.
    device = PartialState(cpu=cpu).device
    mp = default_mixed_precision(device) if cfg.mixed_precision == "auto" else cfg.mixed_precision
    # broadcast_buffers=False: the only buffers are the frozen encoders' constants, which every
    # process loads alike; DDP would otherwise send them from rank 0 before every forward.
    # on_device: Accelerate's own bf16 check (torch.cuda.is_bf16_supported()) asks the current GPU.
    with on_device(device):
        accelerator = Accelerator(cpu=cpu, mixed_precision=mp,
                                  kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    is_main = accelerator.is_main_process
    set_seed(cfg.seed)

    splits = read_splits(view, cfg, model_config, say=is_main)
    # on_device: the loaders' pinned batches, the caches' and everything else tied to CUDA's
    # current GPU belong to this process's GPU
    with on_device(accelerator.device), recorded(view, cfg, out, best_dir, is_main) as run:
        model = build_model(config=model_config, weights=weights)
        if resume_dir is None:
            model.init_box_bias(torch.tensor(splits.train.mean_box()))
        loaders = build_loaders(model, splits, cfg, accelerator, mp, progress and is_main)
        model.to(accelerator.device)  # before the optimizer, so that AdamW can be fused on a GPU
        optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay)
        total_steps = cfg.epochs * len(loaders.sampler)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_warmup(total_steps, int(cfg.warmup_frac * total_steps)))
        state = (restore_run(resume_dir, model, optimizer, scheduler, accelerator, is_main) if resume_dir
                 else RunState())
        run.history = state.history
        model, optimizer = accelerator.prepare(model, optimizer)
        if is_main:
            write_run_files(out, cfg, fingerprint)
            print_start(accelerator.unwrap_model(model), splits, loaders, accelerator, mp, cfg, state)

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
            skipped = once_each(skipped)  # an unreadable image is skipped every epoch: count it once
            row = {"epoch": epoch + 1, **train_stats,
                   "val_loss": val_stats.get("loss"), "val_iou": val_stats.get("iou"),
                   **({"val_pr_f1": val_stats.get("pr_f1")} if "pr_f1" in val_stats else {}),
                   "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 3)}
            state.history.append(row)
            if is_main:
                print(table_row(row))
                _save_epoch(accelerator.unwrap_model(model), optimizer, scheduler, accelerator, out, epoch, row, state)
            accelerator.wait_for_everyone()
        trained = state.start_epoch < cfg.epochs
        if loaders.val is not None and (trained or not (best_dir / CALIBRATION_NAME).exists()):
            calibrate_best(model, loaders.val, accelerator, model_config, autocast_dtype, best_dir)
        if is_main:
            write_metrics(out, state.history, state.best_score)
            print_skipped(skipped)
        accelerator.end_training()
        result = FitResult(out_dir=out, best_dir=best_dir, last_dir=last_dir, history=state.history,
                           skipped=skipped, model=accelerator.unwrap_model(model).eval(),
                           scheduler_steps=scheduler.last_epoch, optimizer_steps=optimizer_steps(optimizer))
        run.finish(result)
    return result


def _save_epoch(model: Grounder, optimizer, scheduler, accelerator, out: Path, epoch: int, row: dict,
               state: RunState) -> None:
    """``best/`` when the epoch's score is the best so far: a multi-box model's validation
    Pr@F1=1 (what gRefCOCO ranks by), else the val IoU (the train IoU without a val split);
    always ``last/`` (with the optimizer, for resume) and ``metrics.json``."""
    score = selection_score(row)
    if score > state.best_score:
        state.best_score = score
        pr_f1 = {"val_pr_f1": row["val_pr_f1"]} if "val_pr_f1" in row else {}
        save_checkpoint(model, out / BEST_DIR, extra={"epoch": epoch + 1, "val_iou": row["val_iou"], **pr_f1})
    save_last(model, optimizer, scheduler, accelerator, out / "last", epoch, state.history, state.best_score)
    write_metrics(out, state.history, state.best_score)


def _train_config(config, options: dict) -> TrainConfig:
    """``config`` (a TrainConfig, a dict of its keys or None) with ``options`` on top."""
    if isinstance(config, GrounderConfig):
        raise InputError("fit(view, config=...) takes a TrainConfig; pass a model's GrounderConfig as model_config=")
    base = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    return TrainConfig.from_dict({**base, **options})
