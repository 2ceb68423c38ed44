"""``TrainConfig``: every option of a training run with its default, saved as
``train_config.json`` in the run's folder; ``fit``, the CLI, the recipes in ``training/`` and the
train operator all read their defaults from it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..data.augment import parse_augment
from ..data.fields import DEFAULT_PROMPT_FIELD
from ..errors import ConfigError
from ..models.config import DEFAULT_PRESET, PRESETS, GrounderConfig, int_in, field_names, get_config, setting_names

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Every option of a training run, with its default. Saved as ``train_config.json`` in
    the run's folder; the recipes in ``training/`` are files of these keys."""

    preset: str = DEFAULT_PRESET
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset, e.g. {"image_size": 448}
    out_dir: Optional[str] = None  # None: runs/<preset>
    epochs: int = 10
    batch_size: int = 32  # phrases per step, grouped by image
    lr: float = 1e-4  # peak learning rate of AdamW
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05  # share of the steps spent warming up, then cosine decay
    grad_clip: float = 1.0  # max gradient norm; 0: no clipping
    augment: str = "none"  # "none", or augment.PARTS joined by "+", e.g. "scale+color"
    phrase_field: str = DEFAULT_PROMPT_FIELD
    gt_field: str = "ground_truth"
    split_field: str = "split"
    train_split: Optional[str] = "train"  # None: train on the whole view
    val_split: Optional[str] = "val"  # None: no validation, best/ by train IoU
    num_workers: Optional[int] = None  # None: default_num_workers(device)
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that support it, else none
    cache_features: bool = True  # frozen features computed once into an on-disk cache
    cache_dir: Optional[str] = None  # None: $FIFTYONE_GROUNDING_HOME/features

    # the feature cache holds frozen features of this many GB at most; beyond, images are encoded
    # on the fly (grouped by image)
    cache_budget_gb: float = 200.0
    # one-box models with a quality head: this share of each batch's phrases is also shown with
    # another image of the batch that lacks its referent, with confidence target 0 (search ranks
    # images by that confidence; RefCOCO has no phrase of an absent object); 0: off
    negative_share: float = 0.25

    # what each option means, for --help and the App's forms
    HELP = {
        "preset": "model preset",
        "model": "overrides of the preset's model config",
        "out_dir": "checkpoints (best/, last/), metrics.json and curves.png go here",
        "epochs": "passes over the train split",
        "batch_size": "phrases per step, grouped by image",
        "lr": "peak learning rate of AdamW, cosine schedule with warm-up",
        "weight_decay": "AdamW weight decay (none on biases and norms)",
        "warmup_frac": "share of the steps spent warming up the learning rate",
        "grad_clip": "largest gradient norm (0: no clipping)",
        "augment": "none, or parts joined by '+': scale (a random crop that keeps the boxes whole), color "
                   "(brightness/contrast/saturation), flip (mirrored, left/right swapped in the phrase; harmful to "
                   "grounding by most papers). Only flip works from the feature cache",
        "phrase_field": "sample field with the referring phrase",
        "gt_field": "Detections field with the true boxes (one per phrase; any number for multi-box presets)",
        "split_field": "sample field naming each sample's split",
        "train_split": "value of the split field to train on (empty: the whole view)",
        "val_split": "value of the split field to validate on and pick best/ by (empty: none)",
        "num_workers": "DataLoader workers",
        "seed": "seeds the weights, the batch order and the augmentation",
        "mixed_precision": "auto (bf16 on GPUs that support it), no, bf16 or fp16",
        "cache_features": "cache the frozen encoders' features on disk",
        "cache_dir": "where the feature cache lives",
        "cache_budget_gb": "the feature cache's largest size; beyond it images are encoded on the fly",
        "negative_share": "share of each batch's phrases also shown with an image of the batch that lacks their "
                          "referent, so that the confidence learns absence (search ranks by it); one-box presets "
                          "with a quality head; 0: off",
    }

    def __post_init__(self):
        checks = [
            (self.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}"),
            (isinstance(self.model, dict), "model must be an object of GrounderConfig overrides"),
            (self.out_dir is None or isinstance(self.out_dir, (str, os.PathLike)), "out_dir must be a path"),
            (int_in(self.epochs, 1, 100_000), "epochs must be an integer >= 1"),
            (int_in(self.batch_size, 1, 1_000_000), "batch_size must be an integer >= 1"),
            (_number(self.lr) and self.lr > 0, "lr must be a positive number"),
            (_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be a number >= 0"),
            (_number(self.warmup_frac) and 0 <= self.warmup_frac < 1, "warmup_frac must be a number in [0, 1)"),
            (_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip must be a number >= 0"),
            (_augment_ok(self.augment), "augment must be 'none' or parts of ('scale', 'color', 'flip') joined "
                                         "by '+', e.g. 'scale+color'"),
            (all(isinstance(getattr(self, k), str) and getattr(self, k)
                 for k in ("phrase_field", "gt_field", "split_field")),
             "phrase_field, gt_field and split_field must be field names"),
            (all(getattr(self, k) is None or isinstance(getattr(self, k), str) for k in ("train_split", "val_split")),
             "train_split and val_split must be split names or null"),
            (self.num_workers is None or int_in(self.num_workers, 0, 1024), "num_workers must be an integer >= 0"),
            (int_in(self.seed, 0, 2**63 - 1), "seed must be an integer >= 0"),
            (self.mixed_precision in MIXED_PRECISIONS, f"mixed_precision must be one of {MIXED_PRECISIONS}"),
            (isinstance(self.cache_features, bool), "cache_features must be true or false"),
            (self.cache_dir is None or isinstance(self.cache_dir, (str, os.PathLike)), "cache_dir must be a path"),
            (_number(self.cache_budget_gb) and self.cache_budget_gb >= 0, "cache_budget_gb must be a number >= 0"),
            (_number(self.negative_share) and 0 <= self.negative_share <= 1,
             "negative_share must be a number in [0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Invalid training option: {message}")
        self.train_split = self.train_split or None  # "" (an empty form field) means none
        self.val_split = self.val_split or None
        get_config(self.preset, **self.model)  # the model overrides must make a valid config

    def model_config(self) -> GrounderConfig:
        return get_config(self.preset, **self.model)

    def resolved_out_dir(self) -> str:
        return os.fspath(self.out_dir) if self.out_dir else os.path.join("runs", self.preset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A config from a recipe's keys; unknown keys are refused by name."""
        if not isinstance(data, dict):
            raise ConfigError("Training options must be a JSON object of TrainConfig keys")
        unknown = sorted(set(data) - field_names(cls))
        if unknown:
            model_keys = [k for k in unknown if k in setting_names()]
            hint = (f"; {model_keys} are model settings: pass them as model={{{model_keys[0]!r}: ...}}"
                    if model_keys else f"; the options are {sorted(field_names(cls))}")
            raise ConfigError(f"Unknown training options {unknown}{hint}")
        return cls(**data)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read the training recipe {path} ({e}); give a JSON file of "
                              "TrainConfig keys like those in training/") from None
        return cls.from_dict(data)

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, default=os.fspath)

    def merged(self, **options) -> "TrainConfig":
        """A copy with ``options`` (TrainConfig keys) replaced; unknown keys are refused by name."""
        return TrainConfig.from_dict({**self.to_dict(), **options})


def _augment_ok(augment) -> bool:

    try:
        parse_augment(augment)
    except ConfigError:
        return False
    return True


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
