"""The ``adapter`` architecture: the frozen image encoder reads the phrase through small adapters.

SwimVG's recipe on DINOv3: the first ``L - k`` blocks run as they are, once per image; then a
learned [REG] token joins the image tokens (beside CLS and the registers, so DINOv3's RoPE leaves
it unrotated) and the last ``k`` frozen blocks run once per phrase, each followed by a text
cross-attention adapter: the image tokens attend to the phrase's BGE tokens through a bottleneck
of width ``adapter_dim``, added through a learned gate ``tanh(g)``. The adapters' output
projections start at zero, so the network starts as the frozen encoder (a gate starting at 0
would too, but it leaves every other adapter weight without a gradient until it opens).

DINOv3's final norm; then ``num_layers`` trained read-out layers in which the [REG] token attends
to the adapted tokens, with 2D sine positions (the frozen blocks' attention was never trained to
gather a box into it, and DINOv3's RoPE leaves no absolute position in the tokens) -> box and
quality.

Only the adapters, the [REG] token, the read-out and the heads train; the encoders' weights never
change and get no gradient. The image features depend on the phrase, so nothing caches: training
encodes the images on the fly, the lower blocks once per image of a batch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .config import GrounderConfig
from .encoders import dinov3_blocks, dinov3_embed, encoder_hidden_size
from ..errors import ConfigError
from .layers import CrossBlock, sine_positions_2d
from .base import GrounderBase, GroundingOutput, box_head


class TextAdapter(nn.Module):
    """Image tokens attend to text tokens through a bottleneck; the result, zero at the start
    (zero-initialised output projection), enters through a learned gate ``tanh(g)``, g from 1."""

    def __init__(self, image_dim: int, text_dim: int, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"{heads} heads do not divide adapter_dim {dim}")
        self.heads = heads
        self.norm = nn.LayerNorm(image_dim)
        self.q_proj = nn.Linear(image_dim, dim)
        self.k_proj = nn.Linear(text_dim, dim)
        self.v_proj = nn.Linear(text_dim, dim)
        self.o_proj = nn.Linear(dim, image_dim)
        nn.init.zeros_(self.o_proj.weight)  # the output starts at zero: the network starts as the frozen encoder
        nn.init.zeros_(self.o_proj.bias)
        self.gate = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor, text: Tensor, text_padding: Tensor) -> Tensor:
        """x (B, N, D_img); text (B, T, D_txt); text_padding (B, T) True where padded."""
        def heads_first(t: Tensor) -> Tensor:  # (B, L, r) -> (B, heads, L, r / heads)
            return t.unflatten(-1, (self.heads, t.shape[-1] // self.heads)).transpose(1, 2)

        q = heads_first(self.q_proj(self.norm(x)))
        k, v = heads_first(self.k_proj(text)), heads_first(self.v_proj(text))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~text_padding[:, None, None, :])
        out = self.o_proj(out.transpose(1, 2).flatten(2))  # (B, N, D_img)
        return x + torch.tanh(self.gate).to(out.dtype) * out


class AdapterGrounder(GrounderBase):
    """A [REG] token and text adapters in the last ``adapter_layers`` frozen DINOv3 blocks, and a
    read-out of the [REG] token."""

    cacheable = False

    def __init__(self, config: GrounderConfig, image_encoder: nn.Module, text_encoder: nn.Module):
        super().__init__(config, image_encoder, text_encoder)
        arch = config.arch  # an AdapterConfig
        blocks = dinov3_blocks(image_encoder)
        if arch.adapter_layers > len(blocks):
            raise ConfigError(f"adapter_layers {arch.adapter_layers} > the image encoder's {len(blocks)} blocks")
        d_img, d_txt = encoder_hidden_size(image_encoder), encoder_hidden_size(text_encoder)
        self.first_adapted = len(blocks) - arch.adapter_layers
        self.reg_token = nn.Parameter(torch.zeros(1, 1, d_img))
        nn.init.normal_(self.reg_token, std=0.02)
        self.adapters = nn.ModuleList([TextAdapter(d_img, d_txt, arch.adapter_dim, arch.num_heads)
                                       for _ in range(arch.adapter_layers)])
        self._positions: Optional[Tensor] = None  # (N + 1, d_img) of the read-out's memory
        self.readout = nn.ModuleList([CrossBlock(d_img, arch.num_heads, arch.dim_feedforward, arch.dropout)
                                      for _ in range(arch.num_layers)])
        self.head = box_head(d_img, config.head_hidden)
        self.confidence_heads(d_img)

    def positions(self, x: Tensor) -> Tensor:
        """2D sine positions of the patch tokens (none for CLS, the registers and [REG]): the
        read-out regresses a box, and DINOv3's RoPE leaves no absolute position in the tokens."""
        side = int(round((x.shape[1] - self.num_prefix - 1) ** 0.5))
        if self._positions is None or self._positions.shape[0] != x.shape[1] or self._positions.device != x.device:
            patches = sine_positions_2d(side, side, x.shape[-1])
            self._positions = torch.cat([patches.new_zeros(self.num_prefix + 1, x.shape[-1]), patches]).to(x.device)
        return self._positions.to(x.dtype)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The text-independent part, once per image: the embeddings and the blocks before the
        adapted ones -> (I, N, D_img) tokens, and DINOv3's RoPE (cos, sin) for them."""
        hidden, rope = dinov3_embed(self.image_encoder, pixel_values)
        for block in dinov3_blocks(self.image_encoder)[:self.first_adapted]:
            hidden = block(hidden, position_embeddings=rope)
        return hidden, rope

    def forward(self, pixel_values: Optional[Tensor] = None, input_ids: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, image_index: Optional[Tensor] = None,
                image_features: Optional[Tensor] = None, text_features: Optional[Tensor] = None,
                judge_boxes: Optional[Tensor] = None) -> GroundingOutput:
        if image_features is not None:
            raise ConfigError("The adapter architecture reads the phrase inside the image encoder: it takes pixels, "
                              "not cached image features (train it with cache_features=False)")
        if text_features is None:
            text_features = self.encode_text(input_ids, attention_mask)
        if image_index is None:
            image_index = torch.arange(text_features.shape[0], device=text_features.device)
        lower, rope = self.encode_images(pixel_values)
        return self.judge(self.decode_lower(lower, rope, text_features, attention_mask, image_index), judge_boxes)

    def decode_lower(self, lower: Tensor, rope: tuple[Tensor, Tensor], text_features: Tensor,
                     attention_mask: Tensor, image_index: Tensor) -> GroundingOutput:
        """The adapted blocks, once per phrase: lower (I, N, D_img); text_features (B, T, D_txt)."""
        x = lower.index_select(0, image_index)  # (B, N, D_img)
        reg = self.reg_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :self.num_prefix], reg, x[:, self.num_prefix:]], dim=1)  # [REG] among the prefix
        text = text_features.to(x.dtype)
        padding = ~attention_mask.bool()
        blocks = dinov3_blocks(self.image_encoder)[self.first_adapted:]
        for block, adapter in zip(blocks, self.adapters):
            x = adapter(block(x, position_embeddings=rope), text, padding)
        x = self.image_encoder.norm(x)
        query = x[:, self.num_prefix]  # (B, D_img): the [REG] token
        memory = x if self.config.arch.pos_embed == "none" else x + self.positions(x)
        for block in self.readout:
            query = block(query[:, None], memory)[:, 0]
        raw = self.head(query).float().sigmoid()
        return self.output(query, self.to_xyxy(raw))
