"""The records a run trains and validates on: the samples of the train and val splits of a view,
read once, with the samples they leave out and why."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..data.records import GroundingRecords, read_records
from ..errors import InputError
from ..models.config import GrounderConfig
from .config import TrainConfig


@dataclass
class Splits:
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


def samples_of_split(view, split_field: str, split: Optional[str]):
    """The samples of ``view`` whose ``split_field`` is ``split`` (None: all of them); refused
    when the dataset has no such field."""
    from fiftyone import ViewField as F

    if split is None:
        return view
    if not view.has_field(split_field):
        raise InputError(f"The dataset has no split field {split_field!r}; pass split_field=... or add one")
    return view.match(F(split_field) == split)


def read_splits(view, cfg: TrainConfig, model_config: GrounderConfig, say: bool = True) -> Splits:
    """The train and val records (multi-box models: with the phrases of no or several boxes, and
    a warning about phrases with more true boxes than the model has queries)."""
    several = model_config.num_queries > 0
    max_boxes = model_config.num_queries if several else None
    train_view = samples_of_split(view, cfg.split_field, cfg.train_split)
    train = read_records(train_view, cfg.phrase_field, cfg.gt_field, several, max_boxes)
    if len(train) == 0:
        raise InputError(f"No trainable samples in the {cfg.train_split or 'whole'} split"
                         + (f"; the first skipped: {train.skipped[:5]}" if train.skipped else "")
                         + f". Check {cfg.phrase_field!r} and {cfg.gt_field!r}, or pass train_split=")
    val = None
    if cfg.val_split:
        val = read_records(samples_of_split(view, cfg.split_field, cfg.val_split), cfg.phrase_field, cfg.gt_field,
                           several, max_boxes)
        val = val if len(val) else None
    over = train.over_capacity + (val.over_capacity if val else 0)
    if over and say:
        print(f"Warning: {over} phrases have more true boxes than the model's {max_boxes} box queries; each query "
              f"takes one box, so these phrases can never be found whole (F1 = 1). Give more queries "
              f"(model={{'num_queries': N}}) to cover them.")
    return Splits(train, val, list(train.skipped) + (list(val.skipped) if val else []))
