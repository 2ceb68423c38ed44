"""What a run reports: the lines it prints when it starts and ends, the per-epoch table (the
seed's columns: train loss, train IoU, val loss, val IoU), ``metrics.json`` and ``curves.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..data.skips import count_by_reason
from ..evaluation.tables import format_metric

if TYPE_CHECKING:
    from ..models.decoder import Grounder
    from .config import TrainConfig
    from .loaders import Loaders
    from .splits import Splits
    from .state import RunState


def best_val_iou(history: list[dict]) -> Optional[float]:
    """The best val IoU of a run's epochs (None without a val split)."""
    vals = [h["val_iou"] for h in history if h.get("val_iou") is not None]
    return max(vals) if vals else None


# -- printed --------------------------------------------------------------------------------------


def print_start(model: Grounder, splits: Splits, loaders: Loaders, accelerator, mp: str, cfg: TrainConfig,
                state: RunState) -> None:
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
    print(table_header())


def print_skipped(skipped: list) -> None:
    if skipped:
        print(f"Skipped {len(skipped)} samples: " + count_by_reason(skipped))


def table_header() -> str:
    return (f"{'epoch':>5} | {'train loss':>10} | {'train IoU':>9} | {'val loss':>9} | {'val IoU':>8} | {'lr':>9} | "
            f"{'s':>6}")


# columns a row shows after its own where the run has them: (key, name)
EXTRA_COLUMNS = (("val_pr_f1", "val Pr@F1=1"), ("crop_area", "crop area"))


def table_row(r: dict) -> str:
    line = (f"{r['epoch']:>5} | {format_metric(r['train_loss'], 10)} | {format_metric(r['train_iou'], 9)} | "
            f"{format_metric(r['val_loss'], 9)} | {format_metric(r['val_iou'], 8)} | {r['lr']:>9.2e} | "
            f"{r['seconds']:>6.1f}")
    extras = [f"{name} {format_metric(r[key])}" for key, name in EXTRA_COLUMNS if key in r]
    return line + ("  (" + ", ".join(extras) + ")" if extras else "")


# -- written --------------------------------------------------------------------------------------


def write_metrics(out: Path, history: list[dict], best_iou: float) -> None:
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
