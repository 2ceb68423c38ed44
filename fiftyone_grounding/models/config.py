"""The model's configuration: ``GrounderConfig`` and the presets.

``GrounderConfig`` holds everything needed to rebuild a model (nanoGPT's ``GPTConfig``) and is
saved as ``config.json`` in every checkpoint. It holds what every architecture shares (encoders,
image size, text length, heads, loss) and ONE nested config of its architecture:

- :class:`DecoderConfig` (``decoder``): the phrase's tokens decode a text-blind image memory
  (presets seed, grounder, tiny);
- :class:`FusionConfig` (``fusion``): a bidirectional encoder over [REG; text; image] on several
  DINOv3 layers, then a box decoder: one box, or box queries (fusion, fusion-multi, tiny-fusion*);
- :class:`AdapterConfig` (``adapter``): text cross-attention adapters inside the last DINOv3
  blocks (adapter, tiny-adapter).

Each nested config validates its own fields. Presets are a small named table of flat settings
plus keyword overrides (timm); :func:`get_config` routes each flat key to the shared part or the
nested config, and refuses by name a setting that the architecture does not read.
``DEFAULT_PRESET`` is the preset used wherever none is named.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from ..errors import ConfigError
from .encoder_specs import (BGE_SMALL, DINOV3_VITB16, IMAGE_ENCODERS, IMAGENET_MEAN, IMAGENET_STD, TEXT_ENCODERS,
                            TINY_IMAGE_ENCODER, TINY_TEXT_ENCODER, known_patch_size)

ARCHITECTURES = ("decoder", "fusion", "adapter")
BOX_FORMATS = ("xyxy", "cxcywh")
QUERY_MODES = ("text", "reg")
POS_EMBEDS = ("none", "sine")
BOX_LOSS_TERMS = ("l1", "giou", "diou")
# quality: BCE of the quality head against the box's IoU; judge: the same head read at other boxes
# (the true box jittered, another object's box, a random box: IoU-Net's jittered boxes), so that
# it can judge any box for the phrase, an annotation's included; score: focal loss of each box
# query's score (multi-box heads); exist: BCE of the phrase's existence score (multi-box heads;
# the presence head of one-box models)
LOSS_TERMS = BOX_LOSS_TERMS + ("quality", "judge", "score", "exist")
MULTI_BOX_TERMS = ("score", "exist")
# The fusion settings that only matter with box queries (num_queries > 0).
_QUERY_ONLY_FIELDS = ("score_thresh", "query_selection")


def int_in(value, lo, hi) -> bool:
    """An integer (not a bool) in [lo, hi]: the check of every integer setting, model or training."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _fraction(value) -> bool:
    """A number in [0, 1) (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _raise_failed(checks) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"Invalid GrounderConfig: {message}")


def _layer_checks(config) -> list:
    """The checks of the settings every architecture's trained layers have."""
    return [
        (int_in(config.num_layers, 1, 64), "num_layers must be an integer in [1, 64]"),
        (int_in(config.dim_feedforward, 8, 65536), "dim_feedforward must be an integer in [8, 65536]"),
        (_fraction(config.dropout), "dropout must be a number in [0, 1)"),
        (config.pos_embed in POS_EMBEDS, f"pos_embed must be one of {POS_EMBEDS}"),
    ]


def _width_checks(config) -> list:
    """The checks of ``d_model`` and the heads that divide it (decoder, fusion)."""
    width_ok = int_in(config.d_model, 8, 8192)
    return [
        (width_ok, "d_model must be an integer in [8, 8192]"),
        (int_in(config.num_heads, 1, 128) and width_ok and config.d_model % config.num_heads == 0,
         "num_heads must divide d_model"),
        (config.pos_embed != "sine" or (width_ok and config.d_model % 4 == 0),
         "d_model must be divisible by 4 with pos_embed='sine'"),
    ]


class _ArchitectureConfig:
    """What the nested configs share: the name of their architecture, the check of their own
    fields when made, and which of their fields their other values leave unread."""

    architecture: ClassVar[str]

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def unread(self) -> set[str]:
        """Its fields that change nothing with its other values (none, but fusion's)."""
        return set()


@dataclass
class DecoderConfig(_ArchitectureConfig):
    """The ``decoder`` architecture: a transformer decoder whose queries are the phrase's tokens
    (and a [REG] query with ``query="reg"``) and whose memory is the image tokens."""

    architecture: ClassVar[str] = "decoder"

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6  # the decoder's layers
    dim_feedforward: int = 2048
    dropout: float = 0.1
    norm_first: bool = False  # pre-norm layers and a final norm; the seed is post-norm
    # Positional encoding added to the image memory: DINOv3's tokens carry RoPE-relative
    # positions only, so "left"/"top" are hard to read without one.
    pos_embed: str = "none"

    def validate(self) -> None:
        _raise_failed(_width_checks(self) + _layer_checks(self) + [
            (isinstance(self.norm_first, bool), "norm_first must be true or false"),
        ])


@dataclass
class FusionConfig(_ArchitectureConfig):
    """The ``fusion`` architecture: the image tokens of several DINOv3 layers, the phrase's tokens
    and a [REG] token in a bidirectional, pre-norm encoder; then a box decoder: one box refined by
    ``refine_layers`` layers, or ``num_queries`` box queries through ``refine_layers`` decoder
    layers (zero, one or several boxes per phrase)."""

    architecture: ClassVar[str] = "fusion"

    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 6  # the fusion encoder's layers
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pos_embed: str = "none"  # 2D sine positions on each tapped layer's grid
    # the DINOv3 layers tapped (1-based; empty: the last), and the average pooling of every tap
    # but the last (fewer tokens)
    image_layers: list[int] = field(default_factory=list)
    level_pool: int = 1
    refine_layers: int = 0  # the box decoder's layers
    # 0, one box per phrase from [REG]; N > 0, N box queries, each a box and a score, and an
    # existence score of the phrase: zero, one or several boxes (those whose score passes
    # score_thresh, the official gRefCOCO scorer's 0.7 by default)
    num_queries: int = 0
    score_thresh: float = 0.7
    # multi-box: the queries start from the num_queries image tokens that a head scores most likely
    # to be one of the phrase's objects (their boxes and features; Deformable DETR's two-stage /
    # DINO's query selection), the proposals trained as one more stage of the set loss
    query_selection: bool = False

    def __post_init__(self):
        try:
            self.image_layers = [int(v) for v in self.image_layers]
        except (TypeError, ValueError) as e:
            raise ConfigError(f"Invalid GrounderConfig: image_layers must be increasing 1-based DINOv3 layer "
                              f"numbers ({e})") from None
        super().__post_init__()

    def validate(self) -> None:
        _raise_failed(_width_checks(self) + _layer_checks(self) + [
            (all(int_in(v, 1, 256) for v in self.image_layers) and self.image_layers == sorted(set(self.image_layers)),
             "image_layers must be increasing 1-based DINOv3 layer numbers"),
            (int_in(self.level_pool, 1, 16), "level_pool must be an integer in [1, 16]"),
            (int_in(self.refine_layers, 0, 16), "refine_layers must be an integer in [0, 16]"),
            (int_in(self.num_queries, 0, 300), "num_queries must be an integer in [0, 300]"),
            (self.num_queries == 0 or int_in(self.refine_layers, 1, 16), _NEEDS_QUERY_DECODER),
            (isinstance(self.score_thresh, (int, float)) and 0.0 <= self.score_thresh <= 1.0,
             "score_thresh must be a number in [0, 1]"),
            (isinstance(self.query_selection, bool) and (not self.query_selection or self.num_queries > 0),
             "query_selection must be true or false, and true only with num_queries > 0"),
        ])

    def unread(self) -> set[str]:
        """Its fields that change nothing with its other values: ``score_thresh`` and
        ``query_selection`` without box queries."""
        return set() if self.num_queries > 0 else set(_QUERY_ONLY_FIELDS)


_NEEDS_QUERY_DECODER = ("num_queries > 0 needs the fusion architecture with refine_layers >= 1 (its query decoder) "
                        "and no quality head (each box's score is its confidence)")


@dataclass
class AdapterConfig(_ArchitectureConfig):
    """The ``adapter`` architecture: text cross-attention adapters of width ``adapter_dim`` in the
    last ``adapter_layers`` frozen DINOv3 blocks, a [REG] token among the image tokens, and a
    read-out of it. The adapters and the read-out work at the image encoder's width: there is no
    ``d_model``."""

    architecture: ClassVar[str] = "adapter"

    num_heads: int = 8  # of the adapters and the read-out
    num_layers: int = 6  # the [REG] token's read-out layers
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pos_embed: str = "none"  # 2D sine positions on the read-out's memory
    adapter_layers: int = 0
    adapter_dim: int = 0

    def validate(self) -> None:
        _raise_failed([(int_in(self.num_heads, 1, 128), "num_heads must be an integer in [1, 128]")]
                      + _layer_checks(self) + [
            (int_in(self.adapter_layers, 0, 256), "adapter_layers must be an integer >= 0"),
            (int_in(self.adapter_dim, 0, 65536), "adapter_dim must be an integer >= 0"),
            (int_in(self.adapter_layers, 1, 256) and int_in(self.adapter_dim, 8, 65536),
             "the adapter architecture needs adapter_layers >= 1 and adapter_dim >= 8"),
            (not int_in(self.num_heads, 1, 128) or not int_in(self.adapter_dim, 8, 65536)
             or self.adapter_dim % self.num_heads == 0, "num_heads must divide adapter_dim"),
        ])


ArchitectureConfig = Union[DecoderConfig, FusionConfig, AdapterConfig]
ARCHITECTURE_CONFIGS: dict[str, type] = {c.architecture: c for c in (DecoderConfig, FusionConfig, AdapterConfig)}


@dataclass
class GrounderConfig:
    """Everything that defines a grounding model: what every architecture shares, and ``arch``,
    the nested config of its architecture. Saved as ``config.json`` in checkpoints.

    ``config.json`` holds the nested form: the shared settings, ``"architecture"``, and the
    architecture's settings under its name (``{"architecture": "fusion", ..., "fusion": {...}}``).
    :meth:`from_dict` also reads the flat form that checkpoints held before (every setting of
    every architecture at the top level; the other architectures' are dropped, as they were never
    read)."""

    preset: str = "custom"
    image_encoder: str = DINOV3_VITB16  # Hub id, local folder, or "tiny:dinov3"
    text_encoder: str = BGE_SMALL  # Hub id, local folder, or "tiny:bert" (tokenizer loads from here too)
    image_size: int = 224
    max_text_len: int = 40
    head_hidden: int = 256
    # "text": the box is read from the mean of the decoded text tokens (the seed);
    # "reg": from a learned [REG] query decoded alongside the text (TransVG). The fusion and
    # adapter architectures always read a [REG] query.
    query: str = "text"
    # what the box head predicts (the model always returns xyxy); fusion and adapter: cxcywh
    box_format: str = "xyxy"
    # A head that predicts the IoU of the model's own box (the confidence of its detections);
    # trained with the "quality" loss term. The seed has none (its exact parameter count).
    quality_head: bool = False
    # One-box models: a head that says whether the phrase's object is in the image at all, from the
    # query (its gradient reaches the fusion, unlike the quality head's); the confidence is
    # P(present) x the predicted IoU. Trained with the "exist" loss term on phrases shown with
    # images that lack their referent (TrainConfig.negative_share): phrase search ranks by it.
    presence_head: bool = False
    loss_weights: dict[str, float] = field(default_factory=lambda: {"diou": 1.0})
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    arch: ArchitectureConfig = field(default_factory=DecoderConfig)

    def __post_init__(self):
        if not isinstance(self.image_encoder, str) or not isinstance(self.text_encoder, str):
            raise ConfigError("Invalid GrounderConfig: image_encoder and text_encoder must be strings")
        if not isinstance(self.arch, tuple(ARCHITECTURE_CONFIGS.values())):
            raise ConfigError("Invalid GrounderConfig: arch must be a DecoderConfig, FusionConfig or AdapterConfig")
        self.image_encoder = IMAGE_ENCODERS.get(self.image_encoder, self.image_encoder)
        self.text_encoder = TEXT_ENCODERS.get(self.text_encoder, self.text_encoder)
        try:
            self.image_mean = tuple(float(v) for v in self.image_mean)
            self.image_std = tuple(float(v) for v in self.image_std)
            self.loss_weights = {str(k): float(v) for k, v in dict(self.loss_weights).items()}
        except (TypeError, ValueError) as e:
            raise ConfigError("Invalid GrounderConfig: image_mean and image_std must be lists of 3 numbers, "
                              f"loss_weights an object of numbers, e.g. {{\"l1\": 5.0}} ({e})") from None
        self.validate()

    # -- what code outside the architectures reads, whatever the architecture -------------

    @property
    def architecture(self) -> str:
        """``"decoder"``, ``"fusion"`` or ``"adapter"``: the kind of :attr:`arch`."""
        return self.arch.architecture

    @property
    def num_queries(self) -> int:
        """How many box queries the model has: 0 for one-box models (one box per phrase), N > 0
        for multi-box models (zero, one or several boxes per phrase; ``fusion`` only)."""
        return self.arch.num_queries if isinstance(self.arch, FusionConfig) else 0

    @property
    def score_thresh(self) -> float:
        """The confidence from which a multi-box model writes its boxes. One-box models write
        their box whatever its confidence: theirs is the default, never applied."""
        return self.arch.score_thresh if isinstance(self.arch, FusionConfig) else FusionConfig.score_thresh

    def validate(self) -> None:
        """Type and range checks of the shared settings and of how they go with the architecture's
        (its own are checked by :attr:`arch`); configs come from files users hand us."""
        patch = known_patch_size(self.image_encoder)
        queries = self.num_queries
        _raise_failed([
            (isinstance(self.preset, str), "preset must be a string"),
            (isinstance(self.image_encoder, str) and self.image_encoder, "image_encoder must be a non-empty string"),
            (isinstance(self.text_encoder, str) and self.text_encoder, "text_encoder must be a non-empty string"),
            (int_in(self.image_size, 16, 4096), "image_size must be an integer in [16, 4096]"),
            (not int_in(self.image_size, 16, 4096) or self.image_size % patch == 0,
             f"image_size must be a multiple of the image encoder's patch size ({patch} px): the encoder drops "
             "the border strip that a partial patch would hold"),
            (int_in(self.max_text_len, 4, 512), "max_text_len must be an integer in [4, 512]"),
            (int_in(self.head_hidden, 4, 65536), "head_hidden must be an integer in [4, 65536]"),
            (self.query in QUERY_MODES, f"query must be one of {QUERY_MODES}"),
            (self.box_format in BOX_FORMATS, f"box_format must be one of {BOX_FORMATS}"),
            (self.loss_weights and set(self.loss_weights) <= set(LOSS_TERMS),
             f"loss_weights keys must be among {LOSS_TERMS}"),
            (all(math.isfinite(w) and w >= 0 for w in self.loss_weights.values())
             and any(self.loss_weights.get(k, 0) > 0 for k in BOX_LOSS_TERMS),
             f"loss_weights must be finite, >= 0, and one of {BOX_LOSS_TERMS} > 0"),
            (isinstance(self.quality_head, bool), "quality_head must be true or false"),
            (self.quality_head == (self.loss_weights.get("quality", 0) > 0),
             "quality_head needs a loss_weights['quality'] > 0, and that weight needs quality_head: true"),
            (self.quality_head or "judge" not in self.loss_weights,
             "loss_weights 'judge' trains the quality head: give it only with quality_head: true"),
            (self.architecture == "decoder" or (self.query == "reg" and self.box_format == "cxcywh"),
             "the fusion and adapter architectures read a [REG] query (query: reg) and predict cxcywh boxes"),
            (queries == 0 or not self.quality_head, _NEEDS_QUERY_DECODER),
            ((queries > 0) == (self.loss_weights.get("score", 0) > 0)
             and (queries > 0 or "score" not in self.loss_weights),
             "num_queries > 0 needs loss_weights 'score' > 0, and only then may it be given"),
            (isinstance(self.presence_head, bool) and (not self.presence_head or (self.quality_head and queries == 0)),
             "presence_head must be true or false, and true only beside a quality head (one-box models): with "
             "quality_head false, give presence_head false too"),
            ((queries > 0 or self.presence_head) == (self.loss_weights.get("exist", 0) > 0)
             and (queries > 0 or self.presence_head or "exist" not in self.loss_weights),
             "loss_weights 'exist' > 0 goes with num_queries > 0 or presence_head, and only with them"),
            (len(self.image_mean) == 3 and len(self.image_std) == 3 and min(self.image_std) > 0
             and all(math.isfinite(v) for v in self.image_mean + self.image_std),
             "image_mean/image_std must have 3 finite values, std > 0"),
        ])

    # -- config.json -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The nested form: the shared settings, ``architecture``, and the architecture's settings
        under its name."""
        shared = dataclasses.asdict(self)
        nested = shared.pop("arch")
        return {"preset": shared.pop("preset"), "architecture": self.architecture, **shared,
                self.architecture: nested}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GrounderConfig":
        """A config from its nested form (:meth:`to_dict`) or the flat form of older checkpoints.
        In the nested form a flat key of the architecture's at the top level overrides the nested
        one, and another architecture's setting is refused by name; in the flat form, where every
        setting of every architecture was written, the other architectures' are dropped."""
        if not isinstance(data, dict):
            raise ConfigError("A grounding config must be a JSON object")
        data = dict(data)
        architecture = data.pop("architecture", "decoder")
        if architecture not in ARCHITECTURE_CONFIGS:
            raise ConfigError(f"Invalid GrounderConfig: architecture must be one of {ARCHITECTURES}")
        nested = data.pop(architecture, None)
        unknown = sorted(set(data) - _SETTINGS)
        if unknown:
            raise ConfigError(f"Unknown GrounderConfig keys: {unknown}")
        if nested is None:  # the flat form
            return _build(architecture, data)[0]
        if not isinstance(nested, dict):
            raise ConfigError(f"Invalid GrounderConfig: {architecture!r} must be an object of its settings")
        unknown = sorted(set(nested) - _SETTINGS)
        if unknown:
            raise ConfigError(f"Unknown GrounderConfig keys: {unknown}")
        misplaced = sorted(set(nested) & _SHARED_FIELDS)
        if misplaced:
            raise ConfigError(f"Invalid GrounderConfig: {misplaced} are shared settings: they go at the top level, "
                              f"not under {architecture!r}")
        config, dropped = _build(architecture, {**nested, **data})
        _refuse_unread(config, dropped, ": leave them out")
        return config

    def to_json(self, path: str) -> None:
        """Write the nested form (:meth:`to_dict`)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: str) -> "GrounderConfig":
        """Read the nested form, or the flat form of checkpoints written before it."""
        try:
            with open(path) as f:
                data = json.load(f)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); write it again with save_checkpoint") from None
        return cls.from_dict(data)


# Every flat setting: the shared ones, "architecture", and each architecture's.
_SHARED_FIELDS = field_names(GrounderConfig) - {"arch"}
_SETTINGS = _SHARED_FIELDS | {"architecture"} | set().union(*(field_names(c) for c in ARCHITECTURE_CONFIGS.values()))


def setting_names() -> set[str]:
    """Every flat setting that :func:`get_config` and a flat ``config.json`` accept."""
    return set(_SETTINGS)


def _build(architecture: str, values: dict[str, Any]) -> tuple[GrounderConfig, set[str]]:
    """A config from flat settings: each to the shared part or the architecture's config.
    Returns it and the names of the settings of other architectures, left out."""
    own = field_names(ARCHITECTURE_CONFIGS[architecture])
    shared = {k: v for k, v in values.items() if k in _SHARED_FIELDS}
    arch = ARCHITECTURE_CONFIGS[architecture](**{k: v for k, v in values.items() if k in own})
    return GrounderConfig(**shared, arch=arch), set(values) - _SHARED_FIELDS - own - {"architecture"}


def _refuse_unread(config: GrounderConfig, given, what_to_do: str) -> None:
    """Refuse by name the ``given`` settings that ``config``'s architecture never reads: silently
    ignored, they would train something other than what was asked."""
    ignored = sorted(set(given) & unused_fields(config))
    if ignored:
        why = " without box queries" if set(ignored) & set(_QUERY_ONLY_FIELDS) else ""
        raise ConfigError(f"{ignored} do nothing in the {config.architecture} architecture{why}{what_to_do}")


def unused_fields(config: GrounderConfig) -> set[str]:
    """The settings that ``config``'s architecture never reads: the other architectures', and
    ``score_thresh`` and ``query_selection`` without box queries."""
    return (_SETTINGS - _SHARED_FIELDS - {"architecture"} - field_names(type(config.arch))) | config.arch.unread()


# The presets' flat settings (what each architecture reads, nothing more; get_config routes them).
# One-box heads: the predicted IoU (quality) and P(present) give the confidence.
_ONE_BOX = dict(quality_head=True, presence_head=True,
                loss_weights={"l1": 5.0, "giou": 2.0, "quality": 1.0, "judge": 1.0, "exist": 1.0})
# Multi-box heads: each box query's score and the phrase's existence give the confidence.
_MULTI_BOX = dict(quality_head=False, presence_head=False,
                  loss_weights={"l1": 5.0, "giou": 2.0, "score": 2.0, "exist": 1.0})
# Position-aware: a [REG] query, (cx, cy, w, h) boxes, 2D sine positions (DETR / TransVG).
_REG_SINE = dict(query="reg", box_format="cxcywh", pos_embed="sine")
# What the v2 presets (fusion, adapter) share: 384 px, a [REG] query, sine positions, the one-box heads.
_V2 = dict(_REG_SINE, **_ONE_BOX, image_size=384, num_heads=8, dim_feedforward=1024, head_hidden=256)
# The tiny encoders and small layers: tests and the offline demo on a CPU.
_TINY = dict(_REG_SINE, **_ONE_BOX, image_encoder=TINY_IMAGE_ENCODER, text_encoder=TINY_TEXT_ENCODER, image_size=64,
             max_text_len=16, num_heads=4, dim_feedforward=256, dropout=0.0, head_hidden=128)

PRESETS: dict[str, dict[str, Any]] = {
    # The original notebook, reproduced exactly: 144,968,836 params, 25,948,420 trainable.
    "seed": dict(),
    # Position-aware fusion: 2D sine positions on the image memory, a [REG] query,
    # (cx, cy, w, h) output, L1 + GIoU (DETR / TransVG).
    "grounder": dict(_REG_SINE, **_ONE_BOX, norm_first=True),
    # Fusion v2 (CLIP-VG's recipe on DINOv3): layers 3, 6, 9, 12 (the first three pooled 2x2), a
    # 6-layer bidirectional encoder over [REG; text; image], 2 box-refinement layers with deep
    # supervision; image features stay text-independent, so they cache. 384 px.
    "fusion": dict(_V2, architecture="fusion", d_model=256, num_layers=6, image_layers=[3, 6, 9, 12], level_pool=2,
                   refine_layers=2),
    # SwimVG's recipe on DINOv3: a [REG] token and text cross-attention adapters (width 256) in
    # the last 6 frozen blocks, one read-out layer for the [REG] token; the image features depend
    # on the phrase, so nothing caches. 384 px.
    "adapter": dict(_V2, architecture="adapter", num_layers=1, adapter_layers=6, adapter_dim=256),
    # Same classes, small configs: tests and the offline demo on a CPU.
    "tiny": dict(_TINY, d_model=128, num_layers=3, norm_first=True),
}
# Generalized grounding: zero, one or several boxes per phrase (gRefCOCO). The fusion encoder,
# then 10 box queries, started from the 10 image tokens most likely to be one of the phrase's
# objects, through 3 decoder layers (self-attention among the queries, cross-attention to the
# fused image tokens; deep supervision, Hungarian matching at every layer).
PRESETS["fusion-multi"] = dict(PRESETS["fusion"], **_MULTI_BOX, refine_layers=3, num_queries=10, query_selection=True)
# The tiny twins of the v2 presets: the same classes with the tiny encoders (2 DINOv3 layers).
PRESETS["tiny-fusion"] = dict(_TINY, architecture="fusion", d_model=128, num_layers=3, image_layers=[1, 2],
                              level_pool=2, refine_layers=2)
PRESETS["tiny-fusion-multi"] = dict(PRESETS["tiny-fusion"], **_MULTI_BOX, refine_layers=3, num_queries=10,
                                    query_selection=True)
PRESETS["tiny-adapter"] = dict(_TINY, architecture="adapter", num_layers=1, adapter_layers=1, adapter_dim=64)


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


def get_config(preset: str = DEFAULT_PRESET, **overrides) -> GrounderConfig:
    """The named preset's config with ``overrides`` (flat settings, each routed to the shared part
    or the architecture's config) applied. An override of a setting that the architecture does not
    read (``norm_first`` on ``fusion``, ``d_model`` on ``adapter``) is refused by name: silently
    ignored, it would train something other than what was asked."""
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - _SETTINGS)
    if unknown:
        raise ConfigError(f"Unknown GrounderConfig keys: {unknown}")
    given = {k: v for k, v in overrides.items() if v is not None and k != "preset"}
    values = {**PRESETS[preset], **given, "preset": preset}
    architecture = values.pop("architecture", "decoder")
    if architecture not in ARCHITECTURE_CONFIGS:
        raise ConfigError(f"Invalid GrounderConfig: architecture must be one of {ARCHITECTURES}")
    config = _build(architecture, values)[0]  # (a preset's settings of another architecture than asked: dropped)
    _refuse_unread(config, given, f" (preset {preset!r}): leave them out, or pick a preset that uses them")
    return config
