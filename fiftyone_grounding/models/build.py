"""Building a grounding network from a preset or a config: the one factory of the three
architectures (``GrounderConfig.architecture``), which share one interface (:class:`GrounderBase`):

- ``decoder`` (``decoder.Grounder``; presets ``seed``, ``grounder``, ``tiny``): the phrase's
  tokens (and a [REG] token) decode the image tokens; the image memory never sees the phrase.
- ``fusion`` (``fusion.FusionGrounder``): several DINOv3 layers, a bidirectional fusion encoder
  over [REG; text; image], then a box decoder: the one-box refinement head (``refine_head.py``) or
  the multi-box query head (``query_head.py``).
- ``adapter`` (``adapter.AdapterGrounder``): text cross-attention adapters inside the last frozen
  DINOv3 blocks, a [REG] token among the image tokens.

Every model returns a :class:`GroundingOutput`: normalized xyxy boxes, and where it has a quality
head the logit of each box's predicted IoU. The loss is in ``losses.py``.
"""

from __future__ import annotations

from typing import Optional

from .adapter import AdapterGrounder
from .base import GrounderBase
from .config import DEFAULT_PRESET, GrounderConfig, get_config
from .decoder import Grounder
from .encoders import load_encoder, load_tokenizer
from .fusion import fusion_grounder

__all__ = ["build_model", "build_tokenizer"]

# architecture -> (config, image encoder, text encoder) -> the network
_ARCHITECTURES = {"decoder": Grounder, "fusion": fusion_grounder, "adapter": AdapterGrounder}


def build_model(preset: str = DEFAULT_PRESET, weights: bool = True, config: Optional[GrounderConfig] = None,
                **overrides) -> GrounderBase:
    """Build the network of a preset (plus overrides) or a full config.

    ``weights=False`` builds the encoders with random weights and no download (parameter
    counts, timing); ``weights=True`` loads them with ``from_pretrained``.
    """
    config = config or get_config(preset, **overrides)
    image_encoder = load_encoder(config.image_encoder, weights=weights, what="image encoder")
    text_encoder = load_encoder(config.text_encoder, weights=weights, what="text encoder")
    return _ARCHITECTURES[config.architecture](config, image_encoder, text_encoder)


def build_tokenizer(config: GrounderConfig):
    return load_tokenizer(config.text_encoder)
