"""The grounding networks: frozen encoders, a trainable fusion, a box head and a quality head.

Three architectures (``GrounderConfig.architecture``), one interface (:class:`GrounderBase`):

- ``decoder`` (:class:`Grounder`; presets ``seed``, ``grounder``, ``tiny``): a transformer decoder
  whose queries are the phrase's tokens (and a [REG] token) and whose memory is the image tokens;
  the image memory never sees the phrase.
  ``image -> DINOv3 -> tokens -> Linear (+ 2D sine positions) -> memory``
  ``phrase -> BERT/BGE -> tokens -> Linear -> queries (+ [REG])``
  ``Decoder(queries, memory) -> MLP head -> normalized box``
- ``fusion`` (``fusion.FusionGrounder``): several DINOv3 layers, a bidirectional fusion encoder
  over [REG; text; image], a small box decoder with deep supervision and iterative refinement.
- ``adapter`` (``adapter.AdapterGrounder``): text cross-attention adapters inside the last frozen
  DINOv3 blocks, a [REG] token among the image tokens.

Every model returns a :class:`GroundingOutput`: normalized xyxy boxes, and where it has a quality
head the logit of each box's predicted IoU. The loss is in ``losses.py``, post-processing into
FiftyOne labels in ``labels.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import boxes as box_ops
from .confidence import Calibration
from .config import DEFAULT_PRESET, GrounderConfig, get_config
from .encoders import encoder_hidden_size, load_encoder, load_tokenizer, num_prefix_tokens, patch_size
from .errors import InputError
from .layers import Decoder, sine_positions_2d


class GroundingOutput(NamedTuple):
    """What a model returns for B phrases."""

    boxes: Tensor  # (B, 4) normalized xyxy in [0, 1]
    quality: Optional[Tensor] = None  # (B,) logits of each box's predicted IoU; None without a quality head
    aux_boxes: tuple = ()  # (B, 4) xyxy boxes of the earlier refinement stages (deep supervision)


class QualityHead(nn.Module):
    """Predicts the IoU of a box with the true box, from the query that produced it and the box
    itself. Both come in detached: this head learns to judge the box and never moves it, nor the
    features it was made from (sharing them cost the box accuracy on the demo). Returns logits."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model + 4, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, query: Tensor, box_cxcywh: Tensor) -> Tensor:
        x = torch.cat([self.norm(query.detach()), box_cxcywh.detach().to(query.dtype)], dim=-1)  # (B, d + 4)
        return self.fc2(F.relu(self.fc1(x))).squeeze(-1).float()  # (B,)


def box_head(dim: int, hidden: int) -> nn.Sequential:
    """LayerNorm -> Linear -> ReLU -> Linear(4): a box (raw logits) from a query."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 4))


class GrounderBase(nn.Module):
    """What every grounding network shares: the frozen encoders (in eval mode, no gradients), the
    text encoding, the quality head, the box format, the confidence's calibration, bookkeeping.

    ``cacheable``: whether the image encoder's output (:meth:`encode_images`) depends on the image
    alone, so that training can cache it on disk.
    """

    cacheable = True

    def __init__(self, config: GrounderConfig, image_encoder: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.num_prefix = num_prefix_tokens(image_encoder)
        self.patch_size = patch_size(image_encoder)
        self.calibration = Calibration()  # quality logit -> confidence; fitted at the end of training

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen encoders never leave eval mode (no dropout, fixed statistics).
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(I, 3, H, W) normalized pixels -> (I, N, D_img) frozen features (what the cache holds)."""
        return self.image_encoder(pixel_values=pixel_values).last_hidden_state

    def feature_spec(self) -> Optional[dict]:
        """Which encoder outputs :meth:`encode_images` returns, for the cache's key (None: the
        last hidden state)."""
        return None

    def image_feature_shape(self) -> tuple[int, int]:
        """(tokens, width) of one image's :meth:`encode_images` output."""
        side = self.config.image_size // self.patch_size
        return self.num_prefix + side * side, encoder_hidden_size(self.image_encoder)

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, D_txt) frozen features."""
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(
        self,
        pixel_values: Optional[Tensor] = None,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        image_index: Optional[Tensor] = None,
        image_features: Optional[Tensor] = None,
        text_features: Optional[Tensor] = None,
    ) -> GroundingOutput:
        """Boxes for phrases over images, each given as model inputs (pixels, token ids) or as
        cached frozen-encoder features; ``image_index`` (B,) maps each phrase to its image
        (default: phrase i -> image i), so an image shared by several phrases is encoded once."""
        if image_features is None:
            image_features = self.encode_images(pixel_values)
        if text_features is None:
            text_features = self.encode_text(input_ids, attention_mask)
        if image_index is None:
            image_index = torch.arange(text_features.shape[0], device=text_features.device)
        return self.decode(image_features, text_features, attention_mask, image_index)

    def decode(self, image_features: Tensor, text_features: Tensor, attention_mask: Tensor,
               image_index: Optional[Tensor] = None) -> GroundingOutput:
        raise NotImplementedError

    # -- boxes ---------------------------------------------------------------------------

    def to_xyxy(self, raw: Tensor) -> Tensor:
        """Sigmoid outputs of the box head -> xyxy in [0, 1]."""
        if self.config.box_format == "cxcywh":
            return box_ops.box_cxcywh_to_xyxy(raw).clamp(0.0, 1.0)
        # The seed's head predicts corners directly; order them so the box is valid.
        x0, y0, x1, y1 = raw.unbind(-1)
        return torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1),
                            torch.maximum(x0, x1), torch.maximum(y0, y1)], dim=-1)

    def output(self, query: Tensor, boxes: Tensor, aux_boxes: tuple = ()) -> GroundingOutput:
        """The output of B phrases: their boxes, and the quality head's judgement of them."""
        quality = None
        if self.quality_head is not None:
            quality = self.quality_head(query, box_ops.box_xyxy_to_cxcywh(boxes))
        return GroundingOutput(boxes, quality, tuple(aux_boxes))

    @torch.no_grad()
    def init_box_bias(self, mean_box_xyxy: Tensor) -> None:
        """Start the box head at the mean training box (its bias in logit space, DETR-style
        prior) instead of a centered half-image box, which the loss takes hundreds of steps
        to unlearn."""
        box = mean_box_xyxy.float().clamp(0.0, 1.0)
        if self.config.box_format == "cxcywh":
            box = box_ops.box_xyxy_to_cxcywh(box)
        last = self.head[-1]
        last.bias.copy_(torch.logit(box.clamp(1e-3, 1 - 1e-3)).to(last.bias.dtype))

    # -- bookkeeping -----------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The weights a checkpoint holds: everything but the frozen encoders."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class Grounder(GrounderBase):
    """The ``decoder`` architecture: phrase tokens (and a [REG] query) decode the image memory."""

    def __init__(self, config: GrounderConfig, image_encoder: nn.Module, text_encoder: nn.Module):
        super().__init__(config, image_encoder, text_encoder)
        d = config.d_model
        self.image_proj = nn.Linear(encoder_hidden_size(image_encoder), d)
        self.text_proj = nn.Linear(encoder_hidden_size(text_encoder), d)
        # Pre-norm stacks need a final norm; the seed (post-norm) has none.
        self.decoder = Decoder(d, config.num_heads, config.dim_feedforward, config.dropout, config.norm_first,
                               config.num_layers)
        self.reg_token = nn.Parameter(torch.zeros(1, 1, d)) if config.query == "reg" else None
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=0.02)
        self.head = box_head(d, config.head_hidden)
        self.quality_head = QualityHead(d, config.head_hidden) if config.quality_head else None
        self._pos_cache: dict[tuple[int, int], Tensor] = {}

    def _positions(self, num_tokens: int, device, dtype) -> Tensor:
        """Sine positions for the image tokens: zeros for CLS/registers, 2D grid for patches."""
        num_patches = num_tokens - self.num_prefix
        side = int(round(math.sqrt(num_patches)))
        if side * side != num_patches:
            raise InputError(f"Expected a square patch grid, got {num_patches} patches: give square images")
        key = (side, side)
        if key not in self._pos_cache:
            grid = sine_positions_2d(side, side, self.config.d_model)
            prefix = torch.zeros(self.num_prefix, self.config.d_model)
            self._pos_cache[key] = torch.cat([prefix, grid], dim=0)
        return self._pos_cache[key].to(device=device, dtype=dtype)

    def decode(
        self,
        image_features: Tensor,
        text_features: Tensor,
        attention_mask: Tensor,
        image_index: Optional[Tensor] = None,
    ) -> GroundingOutput:
        """Fuse frozen features into boxes.

        image_features (I, N, D_img); text_features (B, T, D_txt); attention_mask (B, T);
        image_index (B,) the image of each phrase. Each image's cross-attention keys and values
        are projected once per image, not once per phrase: they are most of the decoder's work
        (N image tokens against a dozen text tokens).
        """
        if image_index is None:
            image_index = torch.arange(text_features.shape[0], device=text_features.device)
        memory = self.image_proj(image_features.to(self.image_proj.weight.dtype))  # (I, N, d)
        if self.config.pos_embed == "sine":
            memory = memory + self._positions(memory.shape[1], memory.device, memory.dtype)
        queries = self.text_proj(text_features.to(self.text_proj.weight.dtype))  # (B, T, d)
        padding = ~attention_mask.bool()  # (B, T) True where padded
        if self.reg_token is not None:
            reg = self.reg_token.to(queries.dtype).expand(queries.shape[0], -1, -1)
            queries = torch.cat([reg, queries], dim=1)  # (B, 1 + T, d)
            padding = torch.cat([padding.new_zeros(padding.shape[0], 1), padding], dim=1)
        out = self.decoder(queries, padding, memory, image_index)  # (B, T', d)
        if self.reg_token is not None:
            pooled = out[:, 0]
        else:
            keep = (~padding).unsqueeze(-1).to(out.dtype)
            pooled = (out * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, d)
        raw = self.head(pooled).float().sigmoid()  # (B, 4)
        return self.output(pooled, self.to_xyxy(raw))


def _architecture(name: str) -> type:
    """The network class of ``GrounderConfig.architecture`` (the v2 ones live in their modules)."""
    if name == "fusion":
        from .fusion import FusionGrounder

        return FusionGrounder
    if name == "adapter":
        from .adapter import AdapterGrounder

        return AdapterGrounder
    return Grounder


def build_model(preset: str = DEFAULT_PRESET, weights: bool = True, config: Optional[GrounderConfig] = None,
                **overrides) -> GrounderBase:
    """Build the network of a preset (plus overrides) or a full config.

    ``weights=False`` builds the encoders with random weights and no download (parameter
    counts, timing); ``weights=True`` loads them with ``from_pretrained``.
    """
    config = config or get_config(preset, **overrides)
    image_encoder = load_encoder(config.image_encoder, weights=weights, what="image encoder")
    text_encoder = load_encoder(config.text_encoder, weights=weights, what="text encoder")
    return _architecture(config.architecture)(config, image_encoder, text_encoder)


def build_tokenizer(config: GrounderConfig):
    return load_tokenizer(config.text_encoder)
