"""The grounding network: frozen encoders, fusion decoder, box head, quality head.

``image -> DINOv3 -> tokens -> Linear (+ 2D sine positions) -> memory``
``phrase -> BERT/BGE -> tokens -> Linear -> queries (+ a learned [REG] query)``
``TransformerDecoder(queries, memory) -> MLP head -> normalized box``
``(query, box) -> quality head -> the box's predicted IoU with the truth (a logit)``

The model returns normalized xyxy boxes whatever its head predicts; the loss is in
``losses.py``, post-processing into pixels or FiftyOne labels in ``labels.py``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import boxes as box_ops
from .config import DEFAULT_PRESET, GrounderConfig, get_config
from .confidence import Calibration
from .encoders import encoder_hidden_size, load_encoder, load_tokenizer, num_prefix_tokens, patch_size
from .errors import ConfigError, InputError


def sine_positions_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's fixed 2D sine positional encoding for an ``height x width`` grid -> (H*W, dim)."""
    if dim % 4:
        raise ConfigError("d_model must be divisible by 4 for 2D sine positions")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    out_y = yy.flatten()[:, None] * omega[None]  # (HW, dim/4)
    out_x = xx.flatten()[:, None] * omega[None]
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)  # (HW, dim)


class GroundingOutput(NamedTuple):
    """What the model returns for B phrases."""

    boxes: Tensor  # (B, 4) normalized xyxy in [0, 1]
    quality: Optional[Tensor] = None  # (B,) logits of each box's predicted IoU; None without a quality head


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


class Grounder(nn.Module):
    """Phrase + image -> one normalized xyxy box (and, with a quality head, its predicted IoU)."""

    def __init__(self, config: GrounderConfig, image_encoder: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        d = config.d_model
        self.num_prefix = num_prefix_tokens(image_encoder)
        self.patch_size = patch_size(image_encoder)
        self.image_proj = nn.Linear(encoder_hidden_size(image_encoder), d)
        self.text_proj = nn.Linear(encoder_hidden_size(text_encoder), d)
        layer = nn.TransformerDecoderLayer(
            d, config.num_heads, config.dim_feedforward, config.dropout,
            batch_first=True, norm_first=config.norm_first,
        )
        # Pre-norm stacks need a final norm; the seed (post-norm) has none.
        self.decoder = nn.TransformerDecoder(
            layer, config.num_layers, norm=nn.LayerNorm(d) if config.norm_first else None
        )
        self.reg_token = nn.Parameter(torch.zeros(1, 1, d)) if config.query == "reg" else None
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=0.02)
        self.head = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, config.head_hidden), nn.ReLU(), nn.Linear(config.head_hidden, 4)
        )
        self.quality_head = QualityHead(d, config.head_hidden) if config.quality_head else None
        self.calibration = Calibration()  # quality logit -> confidence; fitted at the end of training
        self._pos_cache: dict[tuple[int, int], Tensor] = {}

    # -- frozen encoders -------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen encoders never leave eval mode (no dropout, fixed statistics).
        self.image_encoder.eval()
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(I, 3, H, W) normalized pixels -> (I, prefix + H/p * W/p, D_img) frozen features."""
        return self.image_encoder(pixel_values=pixel_values).last_hidden_state

    @torch.no_grad()
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, D_txt) frozen features."""
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # -- trainable fusion --------------------------------------------------------------

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
        image_index (B,) says which image each phrase refers to (default: phrase i -> image i),
        so an image shared by several phrases is encoded once. Returns (B, 4) xyxy in [0, 1],
        and the quality head's (B,) logits where the model has one.
        """
        memory = self.image_proj(image_features.to(self.image_proj.weight.dtype))  # (I, N, d)
        if self.config.pos_embed == "sine":
            memory = memory + self._positions(memory.shape[1], memory.device, memory.dtype)
        queries = self.text_proj(text_features.to(self.text_proj.weight.dtype))  # (B, T, d)
        padding = ~attention_mask.bool()  # (B, T) True where padded
        if self.reg_token is not None:
            reg = self.reg_token.to(queries.dtype).expand(queries.shape[0], -1, -1)
            queries = torch.cat([reg, queries], dim=1)  # (B, 1 + T, d)
            padding = torch.cat([padding.new_zeros(padding.shape[0], 1), padding], dim=1)
        out = self.run_decoder(queries, memory, padding, image_index)  # (B, T', d)
        if self.reg_token is not None:
            pooled = out[:, 0]
        else:
            keep = (~padding).unsqueeze(-1).to(out.dtype)
            pooled = (out * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, d)
        raw = self.head(pooled).float().sigmoid()  # (B, 4)
        boxes = self.to_xyxy(raw)
        if self.quality_head is None:
            return GroundingOutput(boxes)
        return GroundingOutput(boxes, self.quality_head(pooled, box_ops.box_xyxy_to_cxcywh(boxes)))

    def run_decoder(self, queries: Tensor, memory: Tensor, padding: Tensor,
                    image_index: Optional[Tensor] = None) -> Tensor:
        """``self.decoder(queries, memory[image_index], tgt_key_padding_mask=padding)``, computed
        with each image's cross-attention keys and values projected once per image, not once
        per phrase: they are most of the decoder's work (N image tokens against a dozen text
        tokens), and an image has about 7 phrases in RefCOCO. Same parameters, same result
        (``tests/test_model.py`` compares it with ``nn.TransformerDecoder``).

        queries (B, T, d); memory (I, N, d); padding (B, T) True where padded; image_index (B,).
        """
        if image_index is None:
            image_index = torch.arange(queries.shape[0], device=queries.device)
        x = queries
        for layer in self.decoder.layers:
            if layer.norm_first:
                x = x + self._self_attend(layer, layer.norm1(x), padding)
                x = x + self._cross_attend(layer, layer.norm2(x), memory, image_index)
                x = x + layer._ff_block(layer.norm3(x))
            else:
                x = layer.norm1(x + self._self_attend(layer, x, padding))
                x = layer.norm2(x + self._cross_attend(layer, x, memory, image_index))
                x = layer.norm3(x + layer._ff_block(x))
        return x if self.decoder.norm is None else self.decoder.norm(x)

    @staticmethod
    def _self_attend(layer: nn.TransformerDecoderLayer, x: Tensor, padding: Tensor) -> Tensor:
        out = layer.self_attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        return layer.dropout1(out)

    def _cross_attend(self, layer: nn.TransformerDecoderLayer, x: Tensor, memory: Tensor,
                      image_index: Tensor) -> Tensor:
        attn = layer.multihead_attn
        d, heads = x.shape[-1], attn.num_heads
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        batch, length = x.shape[:2]
        # Keys and values once per image (I, N, 2d), then each phrase takes its image's
        # (index_select: its backward is a scatter-add, cheaper than indexing's index_put).
        keys, values = F.linear(memory, weight[d:], bias[d:]).index_select(0, image_index).chunk(2, dim=-1)
        w_q, b_q = weight[:d], bias[:d]

        def heads_first(t: Tensor) -> Tensor:  # (B, L, d) -> (B, heads, L, d / heads)
            return t.unflatten(-1, (heads, d // heads)).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads_first(F.linear(x, w_q, b_q)), heads_first(keys), heads_first(values),
            dropout_p=attn.dropout if self.training else 0.0,
        )  # (B, heads, T, d / heads)
        out = attn.out_proj(out.transpose(1, 2).reshape(batch, length, d))
        return layer.dropout2(out)

    def to_xyxy(self, raw: Tensor) -> Tensor:
        if self.config.box_format == "cxcywh":
            return box_ops.box_cxcywh_to_xyxy(raw).clamp(0.0, 1.0)
        # The seed's head predicts corners directly; order them so the box is valid.
        x0, y0, x1, y1 = raw.unbind(-1)
        return torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1),
                            torch.maximum(x0, x1), torch.maximum(y0, y1)], dim=-1)

    def forward(
        self,
        pixel_values: Optional[Tensor] = None,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        image_index: Optional[Tensor] = None,
        image_features: Optional[Tensor] = None,
        text_features: Optional[Tensor] = None,
    ) -> GroundingOutput:
        """Boxes (B, 4) (and their quality logits) for phrases over images, each given as model
        inputs (pixels, token ids) or as cached frozen-encoder features."""
        if image_features is None:
            image_features = self.encode_images(pixel_values)
        if text_features is None:
            text_features = self.encode_text(input_ids, attention_mask)
        return self.decode(image_features, text_features, attention_mask, image_index)

    @torch.no_grad()
    def init_box_bias(self, mean_box_xyxy: Tensor) -> None:
        """Start the head at the mean training box (its bias in logit space, DETR-style
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


def build_model(preset: str = DEFAULT_PRESET, weights: bool = True, config: Optional[GrounderConfig] = None,
                **overrides) -> Grounder:
    """Build a ``Grounder`` from a preset (plus overrides) or a full config.

    ``weights=False`` builds the encoders with random weights and no download (parameter
    counts, timing); ``weights=True`` loads them with ``from_pretrained``.
    """
    config = config or get_config(preset, **overrides)
    image_encoder = load_encoder(config.image_encoder, weights=weights, what="image encoder")
    text_encoder = load_encoder(config.text_encoder, weights=weights, what="text encoder")
    return Grounder(config, image_encoder, text_encoder)


def build_tokenizer(config: GrounderConfig):
    return load_tokenizer(config.text_encoder)
