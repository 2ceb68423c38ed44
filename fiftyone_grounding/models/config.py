"""Configuration, and every default of the package, in one place.

- ``GrounderConfig`` holds everything needed to rebuild a model (nanoGPT's ``GPTConfig``),
  saved as ``config.json`` in every checkpoint; presets are a small named table plus keyword
  overrides (timm). ``DEFAULT_PRESET`` is the preset used wherever none is named.
- ``TrainConfig`` holds every option of a training run with its default, saved as
  ``train_config.json`` in the run's folder; ``fit``, the CLI, the recipes in ``training/``
  and the train operator all read their defaults from it.
- ``default_apply_batch_size`` / ``default_num_workers``: what inference and training use
  on a device when the caller gives no batch size or worker count.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

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

ARCHITECTURES = ("decoder", "fusion", "adapter")
BOX_FORMATS = ("xyxy", "cxcywh")
QUERY_MODES = ("text", "reg")
POS_EMBEDS = ("none", "sine")
BOX_LOSS_TERMS = ("l1", "giou", "diou")
# quality: BCE of the quality head against the box's IoU; score: focal loss of each box query's
# score (multi-box heads); exist: BCE of the phrase's existence score (multi-box heads; the
# presence head of one-box models)
LOSS_TERMS = BOX_LOSS_TERMS + ("quality", "score", "exist")
MULTI_BOX_TERMS = ("score", "exist")


@dataclass
class GrounderConfig:
    """Everything that defines a grounding model. Saved as ``config.json`` in checkpoints."""

    preset: str = "custom"
    # "decoder": the phrase's tokens decode a text-blind image memory (seed, grounder, tiny);
    # "fusion": a bidirectional encoder over [REG; text; image] on several DINOv3 layers;
    # "adapter": text cross-attention adapters inside the last DINOv3 blocks.
    architecture: str = "decoder"
    image_encoder: str = DINOV3_VITB16  # Hub id, local folder, or "tiny:dinov3"
    text_encoder: str = BGE_SMALL  # Hub id, local folder, or "tiny:bert" (tokenizer loads from here too)
    image_size: int = 224
    max_text_len: int = 40
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6  # decoder: its layers; fusion: the fusion encoder's; adapter: the [REG] read-out's
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
    # A head that predicts the IoU of the model's own box (the confidence of its detections);
    # trained with the "quality" loss term. The seed has none (its exact parameter count).
    quality_head: bool = False
    # One-box models: a head that says whether the phrase's object is in the image at all, from the
    # query (its gradient reaches the fusion, unlike the quality head's); the confidence is
    # P(present) x the predicted IoU. Trained with the "exist" loss term on phrases shown with
    # images that lack their referent (TrainConfig.negative_share): phrase search ranks by it.
    presence_head: bool = False
    loss_weights: dict[str, float] = field(default_factory=lambda: {"diou": 1.0})
    # fusion: the DINOv3 layers tapped (1-based; empty: the last), the average pooling of every
    # tap but the last (fewer tokens), and the box decoder's refinement layers
    image_layers: list[int] = field(default_factory=list)
    level_pool: int = 1
    refine_layers: int = 0
    # adapter: text cross-attention adapters in the last `adapter_layers` DINOv3 blocks, of width
    # `adapter_dim`
    adapter_layers: int = 0
    adapter_dim: int = 0
    # fusion: 0, one box per phrase from [REG]; N > 0, N box queries, each a box and a score, and an
    # existence score of the phrase: zero, one or several boxes (those whose score passes
    # score_thresh, the official gRefCOCO scorer's 0.7 by default)
    num_queries: int = 0
    score_thresh: float = 0.7
    # multi-box: the queries start from the num_queries image tokens that a head scores most likely
    # to be one of the phrase's objects (their boxes and features; Deformable DETR's two-stage /
    # DINO's query selection), the proposals trained as one more stage of the set loss
    query_selection: bool = False
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if not isinstance(self.image_encoder, str) or not isinstance(self.text_encoder, str):
            raise ConfigError("Invalid GrounderConfig: image_encoder and text_encoder must be strings")
        self.image_encoder = IMAGE_ENCODERS.get(self.image_encoder, self.image_encoder)
        self.text_encoder = TEXT_ENCODERS.get(self.text_encoder, self.text_encoder)
        try:
            self.image_mean = tuple(float(v) for v in self.image_mean)
            self.image_std = tuple(float(v) for v in self.image_std)
            self.loss_weights = {str(k): float(v) for k, v in dict(self.loss_weights).items()}
            self.image_layers = [int(v) for v in self.image_layers]
        except (TypeError, ValueError) as e:
            raise ConfigError("Invalid GrounderConfig: image_mean and image_std must be lists of 3 numbers, "
                             f"loss_weights an object of numbers, e.g. {{\"l1\": 5.0}} ({e})") from None
        self.validate()

    def validate(self) -> None:
        """Type and range checks; configs come from files users hand us."""
        checks = [
            (isinstance(self.preset, str), "preset must be a string"),
            (isinstance(self.image_encoder, str) and self.image_encoder, "image_encoder must be a non-empty string"),
            (isinstance(self.text_encoder, str) and self.text_encoder, "text_encoder must be a non-empty string"),
            (_int_in(self.image_size, 16, 4096), "image_size must be an integer in [16, 4096]"),
            (not _int_in(self.image_size, 16, 4096) or self.image_size % known_patch_size(self.image_encoder) == 0,
             f"image_size must be a multiple of the image encoder's patch size ({known_patch_size(self.image_encoder)} "
             "px): the encoder drops the border strip that a partial patch would hold"),
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
             and any(self.loss_weights.get(k, 0) > 0 for k in BOX_LOSS_TERMS),
             f"loss_weights must be finite, >= 0, and one of {BOX_LOSS_TERMS} > 0"),
            (isinstance(self.quality_head, bool), "quality_head must be true or false"),
            (self.quality_head == (self.loss_weights.get("quality", 0) > 0),
             "quality_head needs a loss_weights['quality'] > 0, and that weight needs quality_head: true"),
            (self.architecture in ARCHITECTURES, f"architecture must be one of {ARCHITECTURES}"),
            (all(_int_in(v, 1, 256) for v in self.image_layers) and self.image_layers == sorted(set(self.image_layers)),
             "image_layers must be increasing 1-based DINOv3 layer numbers"),
            (_int_in(self.level_pool, 1, 16), "level_pool must be an integer in [1, 16]"),
            (_int_in(self.refine_layers, 0, 16), "refine_layers must be an integer in [0, 16]"),
            (_int_in(self.adapter_layers, 0, 256), "adapter_layers must be an integer >= 0"),
            (_int_in(self.adapter_dim, 0, 65536), "adapter_dim must be an integer >= 0"),
            (self.architecture == "decoder" or (self.query == "reg" and self.box_format == "cxcywh"),
             "the fusion and adapter architectures read a [REG] query (query: reg) and predict cxcywh boxes"),
            (self.architecture != "adapter" or (self.adapter_layers >= 1 and self.adapter_dim >= 8),
             "the adapter architecture needs adapter_layers >= 1 and adapter_dim >= 8"),
            (self.architecture != "fusion" or self.refine_layers >= 0, "refine_layers must be >= 0"),
            (_int_in(self.num_queries, 0, 300), "num_queries must be an integer in [0, 300]"),
            (self.num_queries == 0 or (self.architecture == "fusion" and self.refine_layers >= 1
                                       and not self.quality_head),
             "num_queries > 0 needs the fusion architecture with refine_layers >= 1 (its query decoder) and no "
             "quality head (each box's score is its confidence)"),
            ((self.num_queries > 0) == (self.loss_weights.get("score", 0) > 0)
             and (self.num_queries > 0 or "score" not in self.loss_weights),
             "num_queries > 0 needs loss_weights 'score' > 0, and only then may it be given"),
            (isinstance(self.presence_head, bool) and (not self.presence_head
                                                       or (self.quality_head and self.num_queries == 0)),
             "presence_head must be true or false, and true only beside a quality head (one-box models): with "
             "quality_head false, give presence_head false too"),
            ((self.num_queries > 0 or self.presence_head) == (self.loss_weights.get("exist", 0) > 0)
             and (self.num_queries > 0 or self.presence_head or "exist" not in self.loss_weights),
             "loss_weights 'exist' > 0 goes with num_queries > 0 or presence_head, and only with them"),
            (isinstance(self.score_thresh, (int, float)) and 0.0 <= self.score_thresh <= 1.0,
             "score_thresh must be a number in [0, 1]"),
            (isinstance(self.query_selection, bool) and (not self.query_selection or self.num_queries > 0),
             "query_selection must be true or false, and true only with num_queries > 0"),
            (len(self.image_mean) == 3 and len(self.image_std) == 3 and min(self.image_std) > 0
             and all(math.isfinite(v) for v in self.image_mean + self.image_std),
             "image_mean/image_std must have 3 finite values, std > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"Invalid GrounderConfig: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GrounderConfig":
        if not isinstance(data, dict):
            raise ConfigError("A grounding config must be a JSON object")
        unknown = sorted(set(data) - field_names(cls))
        if unknown:
            raise ConfigError(f"Unknown GrounderConfig keys: {unknown}")
        return cls(**data)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: str) -> "GrounderConfig":
        try:
            with open(path) as f:
                data = json.load(f)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); write it again with save_checkpoint") from None
        return cls.from_dict(data)


def known_patch_size(image_encoder: str) -> int:
    """The patch size of a known image encoder (1 for others: ``GrounderBase`` checks those once built)."""
    known = KNOWN_ENCODER_CONFIGS.get(image_encoder) or TINY_ENCODER_CONFIGS.get(image_encoder) or {}
    return int(known.get("patch_size", 1))


def _int_in(value, lo, hi) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}



# What the v2 presets (fusion, adapter) share: 384 px, d=256, [REG] query, sine positions, the quality head.
_V2 = dict(image_size=384, d_model=256, num_heads=8, dim_feedforward=1024, head_hidden=256, query="reg",
           pos_embed="sine", box_format="cxcywh", norm_first=True, quality_head=True, presence_head=True,
           loss_weights={"l1": 5.0, "giou": 2.0, "quality": 1.0, "exist": 1.0})

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
        quality_head=True,
        presence_head=True,
        loss_weights={"l1": 5.0, "giou": 2.0, "quality": 1.0, "exist": 1.0},
    ),
    # Fusion v2 (CLIP-VG's recipe on DINOv3): layers 3, 6, 9, 12 (the first three pooled 2x2), a
    # 6-layer bidirectional encoder over [REG; text; image], 2 box-refinement layers with deep
    # supervision; image features stay text-independent, so they cache. 384 px.
    "fusion": dict(_V2, architecture="fusion", num_layers=6, image_layers=[3, 6, 9, 12], level_pool=2,
                   refine_layers=2),
    # SwimVG's recipe on DINOv3: a [REG] token and text cross-attention adapters (width 256) in
    # the last 6 frozen blocks, one read-out layer for the [REG] token; the image features depend
    # on the phrase, so nothing caches. 384 px.
    "adapter": dict(_V2, architecture="adapter", num_layers=1, adapter_layers=6, adapter_dim=256),
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
        quality_head=True,
        presence_head=True,
        loss_weights={"l1": 5.0, "giou": 2.0, "quality": 1.0, "exist": 1.0},
    ),
}
# Generalized grounding: zero, one or several boxes per phrase (gRefCOCO). The fusion encoder,
# then 10 box queries, started from the 10 image tokens most likely to be one of the phrase's
# objects, through 3 decoder layers (self-attention among the queries, cross-attention to the
# fused image tokens; deep supervision, Hungarian matching at every layer).
PRESETS["fusion-multi"] = dict(PRESETS["fusion"], quality_head=False, presence_head=False, refine_layers=3, num_queries=10,
                               query_selection=True, loss_weights={"l1": 5.0, "giou": 2.0, "score": 2.0, "exist": 1.0})
# The tiny twins of the v2 presets: the same classes with the tiny encoders (2 DINOv3 layers).
PRESETS["tiny-fusion"] = dict(PRESETS["tiny"], architecture="fusion", image_layers=[1, 2], level_pool=2,
                              refine_layers=2)
PRESETS["tiny-fusion-multi"] = dict(PRESETS["tiny-fusion"], quality_head=False, presence_head=False, refine_layers=3,
                                    num_queries=10,
                                    query_selection=True,
                                    loss_weights={"l1": 5.0, "giou": 2.0, "score": 2.0, "exist": 1.0})
PRESETS["tiny-adapter"] = dict(PRESETS["tiny"], architecture="adapter", num_layers=1,
                               adapter_layers=1, adapter_dim=64)


# One line per preset, for --help and the App's forms.
PRESET_DESCRIPTIONS = {
    "grounder": "DINOv3 + BGE with the position-aware decoder (GPU)",
    "fusion": "fusion v2: several DINOv3 layers, a bidirectional fusion encoder, box refinement (GPU)",
    "adapter": "fusion v2: text adapters inside the last DINOv3 blocks (GPU; no feature cache)",
    "seed": "the original notebook's model (GPU)",
    "tiny": "small random-weight encoders, trains on a CPU (offline demo, tests)",
    "tiny-fusion": "the fusion architecture on the tiny encoders (tests, CPU)",
    "tiny-adapter": "the adapter architecture on the tiny encoders (tests, CPU)",
    "fusion-multi": "fusion v2 with 10 box queries: zero, one or several boxes per phrase (gRefCOCO; GPU)",
    "tiny-fusion-multi": "fusion-multi on the tiny encoders (tests, CPU, demo --task grec)",
}

# The preset used wherever none is named (fit, the CLI, the train operator): the strongest
# preset with the real encoders. The offline demo and the tests name ``tiny``.
DEFAULT_PRESET = "grounder"


# What each architecture builds from (beyond the encoders, image size, text length, heads and loss):
# a setting outside its list changes nothing, so an override of one is refused by name.
_MULTI_BOX_FIELDS = ("num_queries", "score_thresh", "query_selection")
ARCHITECTURE_FIELDS = {
    "decoder": ("d_model", "num_heads", "num_layers", "dim_feedforward", "dropout", "norm_first", "query",
                "pos_embed", "box_format"),
    # always pre-norm; [REG] query and (cx, cy, w, h) boxes (validated)
    "fusion": ("d_model", "num_heads", "num_layers", "dim_feedforward", "dropout", "pos_embed", "image_layers",
               "level_pool", "refine_layers") + _MULTI_BOX_FIELDS,
    # the adapters and the read-out work at the image encoder's width, not d_model
    "adapter": ("num_heads", "num_layers", "dim_feedforward", "dropout", "pos_embed", "adapter_layers",
                "adapter_dim"),
}
_SHARED_FIELDS = ("preset", "architecture", "image_encoder", "text_encoder", "image_size", "max_text_len",
                  "head_hidden", "quality_head", "presence_head", "loss_weights", "image_mean", "image_std", "query", "box_format")


def unused_fields(config: GrounderConfig) -> set[str]:
    """The settings that ``config``'s architecture never reads (``score_thresh`` and
    ``query_selection`` only matter with box queries)."""
    used = set(_SHARED_FIELDS) | set(ARCHITECTURE_FIELDS[config.architecture])
    if config.num_queries == 0:
        used -= {"score_thresh", "query_selection"}
    return field_names(GrounderConfig) - used


def get_config(preset: str = DEFAULT_PRESET, **overrides) -> GrounderConfig:
    """The named preset's config with ``overrides`` applied. An override of a setting that the
    architecture does not read (``norm_first`` on ``fusion``, ``d_model`` on ``adapter``) is
    refused by name: silently ignored, it would train something other than what was asked."""
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - field_names(GrounderConfig) - {"preset"})
    if unknown:
        raise ConfigError(f"Unknown GrounderConfig keys: {unknown}")
    given = {k: v for k, v in overrides.items() if v is not None and k != "preset"}
    values = dict(PRESETS[preset])
    values.update(given)
    config = GrounderConfig(preset=preset, **values)
    ignored = sorted(set(given) & unused_fields(config))
    if ignored:
        why = " without box queries" if set(ignored) & set(_MULTI_BOX_FIELDS) else ""
        raise ConfigError(f"{ignored} do nothing in the {config.architecture} architecture{why} (preset {preset!r}): "
                          "leave them out, or pick a preset that uses them")
    return config
