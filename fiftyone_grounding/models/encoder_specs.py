"""The frozen encoders the presets name: their Hub ids and short names, their architecture-only
configs (so that a model can be built and counted without downloading anything), the tiny
encoders of the tests and the offline demo, and the image normalization they were trained with.

The weights come from the Hub (``encoders.load_encoder``); nothing here loads anything.
"""

from __future__ import annotations

from typing import Any

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


def known_patch_size(image_encoder: str) -> int:
    """The patch size of a known image encoder (1 for others: ``GrounderBase`` checks those once built)."""
    known = KNOWN_ENCODER_CONFIGS.get(image_encoder) or TINY_ENCODER_CONFIGS.get(image_encoder) or {}
    return int(known.get("patch_size", 1))
