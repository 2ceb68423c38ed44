"""A run's folder and where the run stands: ``last/`` with the optimizer's state (safetensors and
JSON, no pickle) and the schedule, ``best/`` by the selection score, the run's fingerprint, and
resuming from ``last/`` only the run whose fingerprint the folder holds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError, TrainingError
from ..fiftyone_api import is_collection, root_dataset
from ..models.decoder import Grounder
from ..models.checkpoint import WEIGHTS_NAME, load_trainable_weights, resolve_checkpoint_dir, save_checkpoint
from ..models.config import GrounderConfig
from .config import TrainConfig

STATE_JSON = "training_state.json"
FINGERPRINT_NAME = "run_fingerprint.json"  # what the run trains on and how: a resume must match it
OPTIMIZER_NAME = "optimizer.safetensors"
TRAIN_CONFIG_NAME = "train_config.json"


@dataclass
class RunState:
    """Where a run stands: what a resume restores."""

    start_epoch: int = 0
    history: list = field(default_factory=list)
    best_score: float = -1.0


# -- the optimizer's state as files ----------------------------------------------------------


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
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


# -- last/ and best/ ------------------------------------------------------------------------------


def save_last(model: Grounder, optimizer, scheduler, accelerator, last_dir: Path, epoch: int, history: list,
              best_iou: float) -> None:
    tensors, meta = _optimizer_to_files(optimizer)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None  # fp16's loss scale
    state = {"epoch": epoch, "history": history, "best_val_iou": best_iou, "optimizer": meta,
             "scheduler": scheduler.state_dict(), "grad_scaler": scaler}

    def write_state(tmp: Path) -> None:
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2, default=float))

    save_checkpoint(model, last_dir, write_more=write_state)


def selection_score(row: dict) -> float:
    """What ``best/`` is chosen by: the validation Pr@F1=1 where the epoch has one (multi-box
    models), else the val IoU, else the train IoU."""
    for key in ("val_pr_f1", "val_iou", "train_iou"):
        if row.get(key) is not None:
            return row[key]
    return -1.0


# -- resume -------------------------------------------------------------------------------------


def resumable_last(last_dir: Path) -> Optional[Path]:
    """The ``last/`` checkpoint to resume from (or the copy that a kill mid-save left), or None."""
    try:
        folder = resolve_checkpoint_dir(last_dir)
    except CheckpointError:
        return None
    return folder if (folder / STATE_JSON).exists() else None


def restore_run(resume_dir: Path, model: Grounder, optimizer, scheduler, accelerator, is_main: bool) -> RunState:
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
    return RunState(start_epoch=state["epoch"] + 1, history=state["history"], best_score=state["best_val_iou"])


# -- the run's fingerprint ----------------------------------------------------------------------

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


def write_run_files(out: Path, cfg: TrainConfig, fingerprint: dict) -> None:
    """The run's folder with its training config and fingerprint (what a resume checks)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_json(out / TRAIN_CONFIG_NAME)
    (out / FINGERPRINT_NAME).write_text(json.dumps(fingerprint, indent=2, default=str))


def _differences(old, new, path: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two fingerprints."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for k in sorted(set(old) | set(new), key=str)
                for line in _differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _model_read_back(fingerprint: dict) -> dict:
    """The fingerprint with its model config read back through ``GrounderConfig``: a run folder
    written with the flat config of earlier versions holds the same model as the nested form."""
    try:
        model = GrounderConfig.from_dict(fingerprint["model"]).to_dict()
    except (KeyError, TypeError, ConfigError):
        return fingerprint
    return {**fingerprint, "model": json.loads(json.dumps(model, default=str))}


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
    differs = _differences(_model_read_back(saved), fingerprint)
    if differs:
        shown = "; ".join(differs[:6]) + (f"; and {len(differs) - 6} more" if len(differs) > 6 else "")
        raise TrainingError(f"{out} holds another run (it differs in {shown}), so it is not resumed: {ways_out}.")
