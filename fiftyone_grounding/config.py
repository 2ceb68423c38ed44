"""Model configuration: one dataclass, saved with every checkpoint, plus named presets.

``GrounderConfig`` holds everything needed to rebuild a model (nanoGPT's
``GPTConfig``); presets are a small named table plus keyword overrides (timm).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

# Architecture-only configs of the encoders the presets name, so that a model can be
# built (and counted) without downloading anything. The weights come from the Hub.
DINOV3_VITS16 = "facebook/dinov3-vits16-pretrain-lvd1689m"
DINOV3_VITS16PLUS = "facebook/dinov3-vits16plus-pretrain-lvd1689m"
DINOV3_VITB16 = "facebook/dinov3-vitb16-pretrain-lvd1689m"
DINOV3_VITL16 = "facebook/dinov3-vitl16-pretrain-lvd1689m"
BGE_SMALL = "BAAI/bge-small-en-v1.5"
BGE_BASE = "BAAI/bge-base-en-v1.5"

_DINOV3_COMMON = dict(
    model_type="dinov3_vit",
    patch_size=16,
    num_register_tokens=4,
    layerscale_value=1.0,
    rope_theta=100.0,
    query_bias=True,
    key_bias=False,
    value_bias=True,
    proj_bias=True,
    mlp_bias=True,
    layer_norm_eps=1e-5,
)
_BERT_COMMON = dict(
    model_type="bert",
    vocab_size=30522,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)

KNOWN_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    DINOV3_VITS16: dict(_DINOV3_COMMON, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                        intermediate_size=1536, hidden_act="gelu", use_gated_mlp=False),
    DINOV3_VITS16PLUS: dict(_DINOV3_COMMON, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                            intermediate_size=1536, hidden_act="silu", use_gated_mlp=True),
    DINOV3_VITB16: dict(_DINOV3_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, hidden_act="gelu", use_gated_mlp=False),
    DINOV3_VITL16: dict(_DINOV3_COMMON, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, hidden_act="gelu", use_gated_mlp=False),
    BGE_SMALL: dict(_BERT_COMMON, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=1536),
    BGE_BASE: dict(_BERT_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072),
}

# Short names users can pass instead of Hub ids.
IMAGE_ENCODERS = {"vits16": DINOV3_VITS16, "vits16plus": DINOV3_VITS16PLUS,
                  "vitb16": DINOV3_VITB16, "vitl16": DINOV3_VITL16}
TEXT_ENCODERS = {"bge-small": BGE_SMALL, "bge-base": BGE_BASE}

# The tiny preset's encoders: the real classes with small configs and random weights,
# generated once into a local folder and then loaded through ``from_pretrained``.
TINY_IMAGE_ENCODER = "tiny:dinov3"
TINY_TEXT_ENCODER = "tiny:bert"
TINY_ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    TINY_IMAGE_ENCODER: dict(_DINOV3_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, hidden_act="gelu", use_gated_mlp=False,
                             patch_size=8, image_size=64),
    TINY_TEXT_ENCODER: dict(_BERT_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BOX_FORMATS = ("xyxy", "cxcywh")
QUERY_MODES = ("text", "reg")
POS_EMBEDS = ("none", "sine")
LOSS_TERMS = ("l1", "giou", "diou")
WORKER_TYPES = ("thread", "process")  # what decodes images for apply_grounding_model


@dataclass
class GrounderConfig:
    """Everything that defines a grounding model. Saved as ``config.json`` in checkpoints."""

    preset: str = "custom"
    image_encoder: str = DINOV3_VITB16  # Hub id, local folder, or "tiny:dinov3"
    text_encoder: str = BGE_SMALL  # Hub id, local folder, or "tiny:bert" (tokenizer loads from here too)
    image_size: int = 224
    max_text_len: int = 40
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    norm_first: bool = False
    head_hidden: int = 256
    # "text": the box is read from the mean of the decoded text tokens (the seed);
    # "reg": from a learned [REG] query decoded alongside the text (TransVG).
    query: str = "text"
    # Positional encoding added to the image memory: DINOv3's tokens carry RoPE-relative
    # positions only, so "left"/"top" are hard to read without one.
    pos_embed: str = "none"
    box_format: str = "xyxy"  # what the head predicts; the model always returns xyxy
    loss_weights: dict[str, float] = field(default_factory=lambda: {"diou": 1.0})
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if not isinstance(self.image_encoder, str) or not isinstance(self.text_encoder, str):
            raise ValueError("Invalid GrounderConfig: image_encoder and text_encoder must be strings")
        self.image_encoder = IMAGE_ENCODERS.get(self.image_encoder, self.image_encoder)
        self.text_encoder = TEXT_ENCODERS.get(self.text_encoder, self.text_encoder)
        try:
            self.image_mean = tuple(float(v) for v in self.image_mean)
            self.image_std = tuple(float(v) for v in self.image_std)
            self.loss_weights = {str(k): float(v) for k, v in dict(self.loss_weights).items()}
        except (TypeError, ValueError) as e:
            raise ValueError("Invalid GrounderConfig: image_mean and image_std must be lists of 3 numbers, "
                             f"loss_weights an object of numbers, e.g. {{\"l1\": 5.0}} ({e})") from None
        self.validate()

    def validate(self) -> None:
        """Type and range checks; configs come from files users hand us."""
        checks = [
            (isinstance(self.preset, str), "preset must be a string"),
            (isinstance(self.image_encoder, str) and self.image_encoder, "image_encoder must be a non-empty string"),
            (isinstance(self.text_encoder, str) and self.text_encoder, "text_encoder must be a non-empty string"),
            (_int_in(self.image_size, 16, 4096), "image_size must be an integer in [16, 4096]"),
            (_int_in(self.max_text_len, 4, 512), "max_text_len must be an integer in [4, 512]"),
            (_int_in(self.d_model, 8, 8192), "d_model must be an integer in [8, 8192]"),
            (_int_in(self.num_heads, 1, 128) and _int_in(self.d_model, 8, 8192) and self.d_model % self.num_heads == 0,
             "num_heads must divide d_model"),
            (_int_in(self.num_layers, 1, 64), "num_layers must be an integer in [1, 64]"),
            (_int_in(self.dim_feedforward, 8, 65536), "dim_feedforward must be an integer in [8, 65536]"),
            (_int_in(self.head_hidden, 4, 65536), "head_hidden must be an integer in [4, 65536]"),
            (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
             and 0.0 <= self.dropout < 1.0, "dropout must be a number in [0, 1)"),
            (isinstance(self.norm_first, bool), "norm_first must be true or false"),
            (self.query in QUERY_MODES, f"query must be one of {QUERY_MODES}"),
            (self.pos_embed in POS_EMBEDS, f"pos_embed must be one of {POS_EMBEDS}"),
            (self.pos_embed != "sine" or (_int_in(self.d_model, 8, 8192) and self.d_model % 4 == 0),
             "d_model must be divisible by 4 with pos_embed='sine'"),
            (self.box_format in BOX_FORMATS, f"box_format must be one of {BOX_FORMATS}"),
            (self.loss_weights and set(self.loss_weights) <= set(LOSS_TERMS),
             f"loss_weights keys must be among {LOSS_TERMS}"),
            (all(math.isfinite(w) and w >= 0 for w in self.loss_weights.values())
             and any(w > 0 for w in self.loss_weights.values()),
             "loss_weights must be finite, >= 0, and not all 0"),
            (len(self.image_mean) == 3 and len(self.image_std) == 3 and min(self.image_std) > 0
             and all(math.isfinite(v) for v in self.image_mean + self.image_std),
             "image_mean/image_std must have 3 finite values, std > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid GrounderConfig: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GrounderConfig":
        if not isinstance(data, dict):
            raise ValueError("A grounding config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown GrounderConfig keys: {unknown}")
        return cls(**data)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: str) -> "GrounderConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _int_in(value, lo, hi) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


PRESETS: dict[str, dict[str, Any]] = {
    # The original notebook, reproduced exactly: 144,968,836 params, 25,948,420 trainable.
    "seed": dict(),
    # Position-aware fusion: 2D sine positions on the image memory, a [REG] query,
    # (cx, cy, w, h) output, L1 + GIoU (DETR / TransVG).
    "grounder": dict(
        query="reg",
        pos_embed="sine",
        box_format="cxcywh",
        norm_first=True,
        loss_weights={"l1": 5.0, "giou": 2.0},
    ),
    # Same classes, small configs: tests and the offline demo on a CPU.
    "tiny": dict(
        image_encoder=TINY_IMAGE_ENCODER,
        text_encoder=TINY_TEXT_ENCODER,
        image_size=64,
        max_text_len=16,
        d_model=128,
        num_heads=4,
        num_layers=3,
        dim_feedforward=256,
        dropout=0.0,
        head_hidden=128,
        query="reg",
        pos_embed="sine",
        box_format="cxcywh",
        norm_first=True,
        loss_weights={"l1": 5.0, "giou": 2.0},
    ),
}


def get_config(preset: str = "seed", **overrides) -> GrounderConfig:
    """The named preset's config with ``overrides`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return GrounderConfig(preset=preset, **values)
