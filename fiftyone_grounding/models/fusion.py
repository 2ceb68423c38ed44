"""The ``fusion`` architecture: the image tokens read the phrase in a bidirectional encoder.

``image -> DINOv3 -> layers {3, 6, 9, 12} -> LayerNorm + Linear per layer (+ 2D sine positions + a
level embedding) -> image tokens``; ``phrase -> BGE -> tokens -> Linear -> text tokens``;
``Blocks([REG; text; image])`` (CLIP-VG's fusion, 6 layers) -> the fused [REG] token and image
tokens -> a box decoder, one of two heads:

- ``refine_head.RefineHead`` (``num_queries`` 0): one box per phrase from [REG], refined layer by
  layer with deep supervision, and its quality;
- ``query_head.QueryHead`` (``num_queries`` Q > 0, ``fusion-multi``): DETR's decoder with Q box
  queries, each a box and a score, and the phrase's existence score: zero, one or several boxes.

The DINOv3 taps depend on the image alone, so they are what the feature cache holds
(:meth:`FusionGrounder.encode_images`): the last tap at full resolution with its CLS and register
tokens, the others average-pooled ``level_pool`` x ``level_pool`` (fewer tokens for the encoder).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import GrounderBase, GroundingOutput
from .config import FusionConfig, GrounderConfig
from .encoders import dinov3_taps, encoder_hidden_size
from .layers import Block, sine_positions_2d
from .query_head import QueryHead
from .refine_head import RefineHead


class FusionGrounder(GrounderBase):
    """Several DINOv3 layers and a bidirectional fusion encoder; the box decoder on its output is
    a head's (``build_box_decoder`` / ``decode_boxes``: :class:`OneBoxFusionGrounder`,
    :class:`MultiBoxFusionGrounder`; :func:`fusion_grounder` picks one). Its settings are
    ``config.arch``, a ``FusionConfig``."""

    def __init__(self, config: GrounderConfig, image_encoder: nn.Module, text_encoder: nn.Module):
        super().__init__(config, image_encoder, text_encoder)
        arch = config.arch
        d = arch.d_model
        depth = int(image_encoder.config.num_hidden_layers)
        self.layers = list(arch.image_layers) or [depth]
        if self.layers[-1] > depth:
            raise ConfigError(f"image_layers {self.layers} go past the image encoder's {depth} layers")
        self.side = config.image_size // self.patch_size  # patches per side
        if self.side % arch.level_pool:
            raise ConfigError(f"level_pool {arch.level_pool} must divide the {self.side} x {self.side} patch grid "
                              f"({config.image_size} px, patch {self.patch_size})")
        d_img = encoder_hidden_size(image_encoder)
        self.level_norms = nn.ModuleList([nn.LayerNorm(d_img) for _ in self.layers])
        self.level_projs = nn.ModuleList([nn.Linear(d_img, d) for _ in self.layers])
        self.level_embed = nn.Parameter(torch.zeros(len(self.layers), d))
        self.type_embed = nn.Parameter(torch.zeros(3, d))  # [REG], text, image
        self.text_proj = nn.Linear(encoder_hidden_size(text_encoder), d)
        self.reg_token = nn.Parameter(torch.zeros(1, 1, d))
        for p in (self.level_embed, self.type_embed, self.reg_token):
            nn.init.normal_(p, std=0.02)
        self.blocks = nn.ModuleList([Block(d, arch.num_heads, arch.dim_feedforward, arch.dropout)
                                     for _ in range(arch.num_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.build_box_decoder(arch, d, config.head_hidden)
        self.confidence_heads(d)
        self._pos_cache: dict[tuple, tuple[Tensor, Tensor]] = {}  # (device, dtype) -> (positions, levels)

    def build_box_decoder(self, arch: FusionConfig, d: int, head_hidden: int) -> None:
        """The head's layers, on queries of width ``d`` (a head's mixin defines it)."""
        raise NotImplementedError

    def decode_boxes(self, query: Tensor, memory: Tensor) -> GroundingOutput:
        """The head's boxes from the fused [REG] token (B, d) and image tokens (B, N, d) (a head's
        mixin defines it)."""
        raise NotImplementedError

    # -- the cacheable image features ------------------------------------------------------

    def level_sizes(self) -> list[int]:
        """Tokens of each tap in :meth:`encode_images`' output, in order: the last tap (prefix
        and patches), then the earlier taps (pooled patches)."""
        pooled = (self.side // self.config.arch.level_pool) ** 2
        return [self.num_prefix + self.side ** 2] + [pooled] * (len(self.layers) - 1)

    def feature_spec(self) -> dict:
        return {"layers": self.layers, "level_pool": self.config.arch.level_pool}

    def image_feature_shape(self) -> tuple[int, int]:
        return sum(self.level_sizes()), encoder_hidden_size(self.image_encoder)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(I, 3, S, S) -> (I, N, D_img): the taps of :meth:`level_sizes`, concatenated."""
        taps = dinov3_taps(self.image_encoder, pixel_values, self.layers)  # block outputs, before the final norm
        out = [taps[-1]]
        pool = self.config.arch.level_pool
        for tap in taps[:-1]:
            patches = tap[:, self.num_prefix:]  # (I, side^2, D)
            grid = patches.transpose(1, 2).unflatten(-1, (self.side, self.side))  # (I, D, side, side)
            if pool > 1:
                grid = F.avg_pool2d(grid, pool)
            out.append(grid.flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)

    # -- fusion ----------------------------------------------------------------------------

    def _image_positions(self, device, dtype) -> Tensor:
        """(N, d): 2D sine positions of each tap's grid (none for CLS/registers; none at all with
        ``pos_embed="none"``) + its level embedding. The fixed parts are made once per device
        and dtype: a table built on the host every forward would wait for the GPU each time."""
        key = (device, dtype)
        if key not in self._pos_cache:
            arch = self.config.arch
            d, side, pooled = arch.d_model, self.side, self.side // arch.level_pool
            parts = [torch.cat([torch.zeros(self.num_prefix, d), sine_positions_2d(side, side, d)])]
            parts += [sine_positions_2d(pooled, pooled, d)] * (len(self.layers) - 1)
            positions = torch.cat(parts)
            if arch.pos_embed == "none":
                positions = torch.zeros_like(positions)
            levels = torch.repeat_interleave(torch.arange(len(self.layers)), torch.tensor(self.level_sizes()))  # (N,)
            self._pos_cache[key] = (positions.to(device=device, dtype=dtype), levels.to(device))
        positions, levels = self._pos_cache[key]
        return positions + self.level_embed.to(dtype).index_select(0, levels)

    def image_tokens(self, image_features: Tensor) -> Tensor:
        """(I, N, D_img) taps -> (I, N, d) normalized, projected, with positions."""
        dtype = self.level_projs[0].weight.dtype
        sizes = self.level_sizes()
        if image_features.shape[1] != sum(sizes):
            raise ConfigError(f"Expected {sum(sizes)} image tokens (taps {self.layers}, {self.config.image_size} px), "
                              f"got {image_features.shape[1]}: the features were encoded for another config")
        parts = torch.split(image_features.to(dtype), sizes, dim=1)
        tokens = torch.cat([proj(norm(p)) for p, norm, proj in zip(parts, self.level_norms, self.level_projs)], 1)
        return tokens + self._image_positions(tokens.device, tokens.dtype) + self.type_embed[2].to(dtype)

    def decode(self, image_features: Tensor, text_features: Tensor, attention_mask: Tensor,
               image_index: Optional[Tensor] = None) -> GroundingOutput:
        """image_features (I, N, D_img) taps; text_features (B, T, D_txt); attention_mask (B, T);
        image_index (B,) the image of each phrase."""
        if image_index is None:
            image_index = torch.arange(text_features.shape[0], device=text_features.device)
        image = self.image_tokens(image_features).index_select(0, image_index)  # (B, N, d)
        text = self.text_proj(text_features.to(self.text_proj.weight.dtype)) + self.type_embed[1]  # (B, T, d)
        batch = text.shape[0]
        reg = (self.reg_token + self.type_embed[0]).to(text.dtype).expand(batch, -1, -1)
        x = torch.cat([reg, text, image], dim=1)  # (B, 1 + T + N, d)
        padding = torch.cat([attention_mask.new_zeros(batch, 1).bool(), ~attention_mask.bool(),
                             attention_mask.new_zeros(batch, image.shape[1]).bool()], dim=1)
        for block in self.blocks:
            x = block(x, padding)
        x = self.ln_f(x)
        query, memory = x[:, 0], x[:, 1 + text.shape[1]:]  # (B, d), (B, N, d)
        return self.decode_boxes(query, memory)


class OneBoxFusionGrounder(RefineHead, FusionGrounder):
    """The fusion architecture with the one-box refinement head (``fusion``, ``tiny-fusion``)."""


class MultiBoxFusionGrounder(QueryHead, FusionGrounder):
    """The fusion architecture with the multi-box query head (``fusion-multi``, ``tiny-fusion-multi``)."""


def fusion_grounder(config: GrounderConfig, image_encoder: nn.Module, text_encoder: nn.Module) -> FusionGrounder:
    """The fusion network of ``config``: with box queries (``num_queries`` > 0) the multi-box head,
    else the one-box head."""
    head = MultiBoxFusionGrounder if config.num_queries > 0 else OneBoxFusionGrounder
    return head(config, image_encoder, text_encoder)
