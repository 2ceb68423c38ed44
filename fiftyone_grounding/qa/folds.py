"""Honest predictions: a model never scores an annotation it trained on.

Given a preset, :func:`train_fold_models` trains k models on image-disjoint folds of the view
(:func:`image_folds`; an image's phrases all in one fold) and each fold is scored by the model that
did not see it. The frozen-encoder feature cache is shared by the k runs, so the images are encoded
once. Each fold's run lives in ``<out_dir>/fold<i>-<hash>``, the hash naming which samples the
fold holds out (also listed in its ``held_out.json``): an interrupted scoring resumes the folds
already trained, and a view whose folds have changed since (samples added or left out) trains new
ones, never reusing a model that trained on a sample it is now to score.

Given a trained checkpoint, :class:`TrainedImages` finds the images its training run recorded on
this dataset (its view's train split, as the split field says now) so that every phrase of them
is left out of the scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..data.records import GroundingRecords
from ..engine.splits import samples_of_split
from ..fiftyone_api import root_dataset
from ..errors import CheckpointError
from ..models.checkpoint import hub_checkpoint, resolve_checkpoint_dir
from ..runs import TRAIN_METHOD

FOLD_SPLIT_FIELD = "label_error_split"  # the fold runs' split field: train / val / held_out
VAL_SHARE = 0.1  # of the images a fold trains on: validation (best checkpoint, calibration)


def image_folds(filepaths: list[str], k: int, seed: int = 0) -> np.ndarray:
    """Each row's fold in ``range(k)``, by image: the images shuffled (seeded) and dealt in turn,
    so that no image is in two folds and the folds differ in size by at most one image."""
    images = sorted(set(filepaths))
    order = np.random.default_rng([seed, 26]).permutation(len(images))
    fold_of = {images[j]: n % k for n, j in enumerate(order)}
    return np.asarray([fold_of[p] for p in filepaths], dtype=np.int64)


def _fold_splits(records: GroundingRecords, folds: np.ndarray, fold: int, seed: int) -> dict:
    """sample id -> "held_out" (the fold), "val" (a share of the other images) or "train"."""
    others = sorted({p for p, f in zip(records.filepaths, folds) if f != fold})
    rng = np.random.default_rng([seed, fold, 27])
    val = {others[i] for i in rng.choice(len(others), size=max(1, int(round(VAL_SHARE * len(others)))),
                                         replace=False)} if len(others) > 1 else set()
    return {sid: "held_out" if f == fold else ("val" if p in val else "train")
            for sid, p, f in zip(records.sample_ids, records.filepaths, folds)}


def train_fold_models(view, records: GroundingRecords, folds: np.ndarray, out_dir, *, train_options: dict,
                      say: Callable[[str], None] = print, progress: bool = True,
                      progress_callback: Optional[Callable[[float, str], None]] = None) -> list[Path]:
    """Train one model per fold on the other folds' images (``fit`` with ``train_options``);
    returns each fold's ``best/`` checkpoint folder."""
    from ..engine.fit import fit

    import hashlib
    import json

    dataset = root_dataset(view)
    k = int(folds.max()) + 1
    best = []
    for fold in range(k):
        splits = _fold_splits(records, folds, fold, int(train_options.get("seed", 0)))
        held_out = sorted(sid for sid, split in splits.items() if split == "held_out")
        digest = hashlib.sha256(json.dumps([held_out, sorted(splits.items())]).encode()).hexdigest()[:8]
        run_dir = Path(out_dir) / f"fold{fold}-{digest}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "held_out.json").write_text(json.dumps({"fold": fold, "sample_ids": held_out}))
        dataset.set_values(FOLD_SPLIT_FIELD, splits, key_field="id")
        say(f"Fold {fold + 1}/{k}: training on {sum(v == 'train' for v in splits.values())} phrases whose images "
            f"fold {fold + 1} does not hold")

        def fold_progress(fraction: float, label: str, fold=fold) -> None:
            if progress_callback is not None:
                progress_callback((fold + fraction) / k, f"fold {fold + 1}/{k}: {label}")

        result = fit(view, **{**train_options, "out_dir": str(run_dir),
                              "split_field": FOLD_SPLIT_FIELD, "train_split": "train", "val_split": "val"},
                     progress=progress, progress_callback=fold_progress)
        best.append(result.best_dir)
    return best


class TrainedImages:
    """The images ``checkpoint``'s training run trained on, as recorded on this dataset (its view's
    train split, as the split field says now): :meth:`rows` finds them among any records, one
    query per call, so a view is checked a part at a time. ``key``: the run's key (None where the
    dataset holds no record of training that checkpoint: nothing is left out)."""

    def __init__(self, view, checkpoint):
        self.key, self.train_view = None, None
        if hub_checkpoint(checkpoint) is not None:  # a Hub repository or a zoo name: no run folder here to match
            return
        dataset = root_dataset(view)
        try:
            folder = resolve_checkpoint_dir(checkpoint).resolve()
        except CheckpointError:  # a zoo model's name: trained elsewhere, no record here
            return
        for key in dataset.list_runs(method=TRAIN_METHOD):
            config = dataset.get_run_info(key).config
            run_dir = getattr(config, "out_dir", None)
            if not run_dir or Path(run_dir).resolve() not in (folder, *folder.parents):  # its best/, last/, ...
                continue
            train_config = getattr(config, "train_config", None) or {}
            self.key = key
            self.train_view = samples_of_split(dataset.load_run_view(key), train_config.get("split_field", "split"),
                                               train_config.get("train_split", "train"))
            return

    def rows(self, records: GroundingRecords) -> np.ndarray:
        """The rows of ``records`` whose image the run trained on (a model may remember an image's
        objects: every phrase of a trained image is left out, not only the trained samples)."""
        if self.train_view is None or not len(records):
            return np.zeros(0, dtype=np.int64)
        paths = sorted(set(records.filepaths))
        images = set(self.train_view.match({"filepath": {"$in": paths}}).distinct("filepath"))
        return np.asarray([i for i, path in enumerate(records.filepaths) if path in images], dtype=np.int64)

