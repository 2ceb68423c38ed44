"""The ``decoder`` architecture (presets ``seed``, ``grounder``, ``tiny``): a transformer decoder
whose queries are the phrase's tokens (and a [REG] token) and whose memory is the image tokens;
the image memory never sees the phrase.

``image -> DINOv3 -> tokens -> Linear (+ 2D sine positions) -> memory``
``phrase -> BERT/BGE -> tokens -> Linear -> queries (+ [REG])``
``Decoder(queries, memory) -> MLP head -> normalized box``
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..errors import InputError
from .base import GrounderBase, GroundingOutput, box_head
from .config import GrounderConfig
from .encoders import encoder_hidden_size
from .layers import Decoder, sine_positions_2d


class Grounder(GrounderBase):
    """The ``decoder`` architecture: phrase tokens (and a [REG] query) decode the image memory.
    Its layers' settings are ``config.arch``, a ``DecoderConfig``."""

    def __init__(self, config: GrounderConfig, image_encoder: nn.Module, text_encoder: nn.Module):
        super().__init__(config, image_encoder, text_encoder)
        arch = config.arch
        d = arch.d_model
        self.image_proj = nn.Linear(encoder_hidden_size(image_encoder), d)
        self.text_proj = nn.Linear(encoder_hidden_size(text_encoder), d)
        # Pre-norm stacks need a final norm; the seed (post-norm) has none.
        self.decoder = Decoder(d, arch.num_heads, arch.dim_feedforward, arch.dropout, arch.norm_first, arch.num_layers)
        self.reg_token = nn.Parameter(torch.zeros(1, 1, d)) if config.query == "reg" else None
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=0.02)
        self.head = box_head(d, config.head_hidden)
        self.confidence_heads(d)
        self._pos_cache: dict[tuple, Tensor] = {}  # (grid side, device, dtype) -> (N, d)

    def _positions(self, num_tokens: int, device, dtype) -> Tensor:
        """Sine positions for the image tokens: zeros for CLS/registers, 2D grid for patches; made
        once per grid, device and dtype (a table copied from the host every forward would wait
        for the GPU each time)."""
        num_patches = num_tokens - self.num_prefix
        side = int(round(math.sqrt(num_patches)))
        if side * side != num_patches:
            raise InputError(f"Expected a square patch grid, got {num_patches} patches: give square images")
        key = (side, device, dtype)
        if key not in self._pos_cache:
            d = self.config.arch.d_model
            grid = sine_positions_2d(side, side, d)
            prefix = torch.zeros(self.num_prefix, d)
            self._pos_cache[key] = torch.cat([prefix, grid], dim=0).to(device=device, dtype=dtype)
        return self._pos_cache[key]

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
        if self.config.arch.pos_embed == "sine":
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
