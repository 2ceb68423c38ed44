"""Transformer layers written out, with named parts (nanoGPT's ``Block``): attention, MLP, norms.

``Attention`` and ``DecoderBlock`` keep the parameter names of ``nn.MultiheadAttention`` and
``nn.TransformerDecoderLayer`` (``in_proj_weight``, ``out_proj``, ``linear1``, ``norm1``, ...), so
checkpoints of the first decoder load as they are; ``tests/test_model.py`` checks the outputs and
gradients against PyTorch's own layers. ``Block`` and ``CrossBlock`` are the pre-norm layers of
the fusion architecture.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sine_positions_2d(height: int, width: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's fixed 2D sine positional encoding for an ``height x width`` grid -> (H*W, dim).
    Positions are relative to the grid (cell centres in [0, 1]), so grids of other sizes of the
    same image agree where they overlap."""
    if dim % 4:
        raise ValueError("d_model must be divisible by 4 for 2D sine positions")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 * math.pi
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 * math.pi
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    out_y = yy.flatten()[:, None] * omega[None]  # (HW, dim/4)
    out_x = xx.flatten()[:, None] * omega[None]
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)  # (HW, dim)


def sine_box_embedding(boxes_cxcywh: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalized (cx, cy, w, h) boxes (..., 4) -> (..., dim), dim/4 per coordinate."""
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=boxes_cxcywh.device) / quarter)
    angles = boxes_cxcywh.float()[..., None] * 2 * math.pi * omega  # (..., 4, dim/4)
    return torch.cat([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(-2)  # (..., dim)


def inverse_sigmoid(x: Tensor, eps: float = 1e-4) -> Tensor:
    """The logit of ``x`` clamped to [eps, 1 - eps]: where a box head's refinement adds its deltas
    to a sigmoid box (Deformable DETR's ``inverse_sigmoid``)."""
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class Attention(nn.Module):
    """Multi-head attention: one packed input projection, ``scaled_dot_product_attention``, an
    output projection. Queries attend to ``keys_values`` (itself for self-attention); keys and
    values can also be projected once per image (:meth:`project_keys_values`) and shared by the
    phrases of that image."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the width {dim}")
        self.heads = heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def project_keys_values(self, x: Tensor, values_from: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(N, L, d) -> keys and values (N, L, d) each; the values from ``values_from`` where the
        keys carry positions that the values must not (DETR's ``with_pos_embed``)."""
        d = x.shape[-1]
        if values_from is None:
            return F.linear(x, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, dim=-1)
        return (F.linear(x, self.in_proj_weight[d:2 * d], self.in_proj_bias[d:2 * d]),
                F.linear(values_from, self.in_proj_weight[2 * d:], self.in_proj_bias[2 * d:]))

    def forward(self, x: Tensor, keys_values: Optional[Tensor] = None, key_padding: Optional[Tensor] = None,
                projected: Optional[tuple[Tensor, Tensor]] = None, values_from: Optional[Tensor] = None) -> Tensor:
        """x (B, T, d); ``keys_values`` (B, L, d) (default: x), or ``projected`` keys and values;
        ``values_from`` (B, L, d): the values' input where it differs from the keys' (positions
        added to queries and keys only); ``key_padding`` (B, L) True where a key is padding.
        Returns (B, T, d)."""
        batch, length, d = x.shape
        q = F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d])
        keys, values = projected if projected is not None else self.project_keys_values(
            x if keys_values is None else keys_values, values_from)

        def heads_first(t: Tensor) -> Tensor:  # (B, L, d) -> (B, heads, L, d / heads)
            return t.unflatten(-1, (self.heads, d // self.heads)).transpose(1, 2)

        mask = None
        if key_padding is not None:
            mask = ~key_padding[:, None, None, :]  # (B, 1, 1, L) True where attended
        out = F.scaled_dot_product_attention(heads_first(q), heads_first(keys), heads_first(values),
                                             attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, d))


class DecoderBlock(nn.Module):
    """A transformer decoder layer: self-attention over the queries, cross-attention to the image
    memory, a ReLU MLP, pre- or post-norm (the parameters and names of
    ``nn.TransformerDecoderLayer``). The memory's keys and values come projected per image and
    indexed per phrase (an image has about 7 phrases in RefCOCO)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm_first = norm_first
        self.dropout = dropout
        self.self_attn = Attention(dim, heads, dropout)
        self.multihead_attn = Attention(dim, heads, dropout)
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training)

    def _mlp(self, x: Tensor) -> Tensor:
        return self._drop(self.linear2(self._drop(F.relu(self.linear1(x)))))

    def forward(self, x: Tensor, padding: Tensor, memory: Tensor, image_index: Tensor,
                query_pos: Optional[Tensor] = None) -> Tensor:
        """x (B, T, d) queries, padding (B, T) True where padded; memory (I, N, d) per image,
        image_index (B,) the image of each phrase; ``query_pos`` (B, T, d): the queries' positions
        (e.g. their boxes, embedded), added to the attention's queries and keys only, never to the
        values or the residual stream (DETR's ``with_pos_embed``: positions do not pile up layer
        after layer)."""
        keys, values = self.multihead_attn.project_keys_values(memory)  # once per image
        # index_select: its backward is a scatter-add, cheaper than indexing's index_put
        projected = (keys.index_select(0, image_index), values.index_select(0, image_index))

        def with_pos(t: Tensor) -> Tensor:
            return t if query_pos is None else t + query_pos

        def self_attention(h: Tensor) -> Tensor:
            if query_pos is None:
                return self.self_attn(h, key_padding=padding)
            return self.self_attn(with_pos(h), key_padding=padding, values_from=h)

        if self.norm_first:
            x = x + self._drop(self_attention(self.norm1(x)))
            x = x + self._drop(self.multihead_attn(with_pos(self.norm2(x)), projected=projected))
            return x + self._mlp(self.norm3(x))
        x = self.norm1(x + self._drop(self_attention(x)))
        x = self.norm2(x + self._drop(self.multihead_attn(with_pos(x), projected=projected)))
        return self.norm3(x + self._mlp(x))


class Decoder(nn.Module):
    """A stack of ``DecoderBlock``s and, for pre-norm stacks, a final norm (as ``nn.TransformerDecoder``)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, norm_first: bool, layers: int):
        super().__init__()
        # copies of one initialized layer, as nn.TransformerDecoder makes them: the presets'
        # weights start where they always did
        first = DecoderBlock(dim, heads, hidden, dropout, norm_first)
        self.layers = nn.ModuleList([first] + [copy.deepcopy(first) for _ in range(layers - 1)])
        self.norm = nn.LayerNorm(dim) if norm_first else None

    def forward(self, x: Tensor, padding: Tensor, memory: Tensor, image_index: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, padding, memory, image_index)
        return x if self.norm is None else self.norm(x)


class MLP(nn.Module):
    """Two linear layers with a GELU between (nanoGPT's ``MLP``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, out: Optional[int] = None):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, out or dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(nn.Module):
    """A pre-norm transformer encoder layer (nanoGPT's ``Block``): ``ln_1``, ``attn``, ``ln_2``, ``mlp``."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden, dropout)
        self.dropout = dropout

    def forward(self, x: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        x = x + F.dropout(self.attn(self.ln_1(x), key_padding=padding), self.dropout, self.training)
        return x + self.mlp(self.ln_2(x))


class CrossBlock(nn.Module):
    """A pre-norm layer in which queries attend to a memory: ``ln_1``, ``cross_attn``, ``ln_2``, ``mlp``."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden, dropout)
        self.dropout = dropout

    def forward(self, x: Tensor, memory: Tensor, memory_padding: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None) -> Tensor:
        """x (B, T, d) queries; memory (B, L, d); ``query_pos`` (B, T, d) added to the attention's
        queries only (DETR's ``with_pos_embed``), not to the residual stream."""
        h = self.ln_1(x)
        attended = self.cross_attn(h if query_pos is None else h + query_pos, keys_values=memory,
                                   key_padding=memory_padding)
        x = x + F.dropout(attended, self.dropout, self.training)
        return x + self.mlp(self.ln_2(x))
