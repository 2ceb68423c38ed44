"""The ``fusion`` architecture: the image tokens read the phrase in a bidirectional encoder.

``image -> DINOv3 -> layers {3, 6, 9, 12} -> LayerNorm + Linear per layer (+ 2D sine positions + a
level embedding) -> image tokens``; ``phrase -> BGE -> tokens -> Linear -> text tokens``;
``Blocks([REG; text; image])`` (CLIP-VG's fusion, 6 layers) -> the [REG] token -> a first box;
``CrossBlocks`` refine it (DETR's iterative refinement: each layer reads the fused image tokens at
the current box and moves it, every stage's box is trained: deep supervision) -> the box and its
quality.

With ``num_queries`` Q > 0 (``fusion-multi``) the box decoder is DETR's instead: Q box queries
(learned, plus the fused [REG] token; with ``query_selection``, as in the multi presets, each
query starts from one of the Q fused image tokens that a head rates most likely to be one of the
phrase's objects, with that token's box) through ``refine_layers`` decoder layers (self-attention
among the queries, cross-attention to the fused image tokens), each layer moving every query's
box and scoring it; an existence score for the whole phrase comes from [REG]. Training matches
queries to the true boxes by the Hungarian algorithm at every layer (``losses.py``); a phrase
gets every box whose confidence (score x existence) passes ``score_thresh``, none when it
refers to nothing.

The DINOv3 taps depend on the image alone, so they are what the feature cache holds
(:meth:`FusionGrounder.encode_images`): the last tap at full resolution with its CLS and register
tokens, the others average-pooled ``level_pool`` x ``level_pool`` (fewer tokens for the encoder).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import GrounderConfig
from .encoders import dinov3_taps, encoder_hidden_size
from ..errors import ConfigError
from .layers import MLP, Block, CrossBlock, DecoderBlock, sine_box_embedding, sine_positions_2d
from . import boxes as box_ops
from .base import GrounderBase, GroundingOutput, box_head


def _inverse_sigmoid(x: Tensor, eps: float = 1e-4) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class FusionGrounder(GrounderBase):
    """Several DINOv3 layers, a bidirectional fusion encoder, a refining box decoder."""

    def __init__(self, config: GrounderConfig, image_encoder: nn.Module, text_encoder: nn.Module):
        super().__init__(config, image_encoder, text_encoder)
        d = config.d_model
        depth = int(image_encoder.config.num_hidden_layers)
        self.layers = list(config.image_layers) or [depth]
        if self.layers[-1] > depth:
            raise ConfigError(f"image_layers {self.layers} go past the image encoder's {depth} layers")
        self.side = config.image_size // self.patch_size  # patches per side
        if self.side % config.level_pool:
            raise ConfigError(f"level_pool {config.level_pool} must divide the {self.side} x {self.side} patch grid "
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
        self.blocks = nn.ModuleList([Block(d, config.num_heads, config.dim_feedforward, config.dropout)
                                     for _ in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.multi = config.num_queries > 0
        if self.multi:
            q = config.num_queries
            self.box_embed = MLP(d, d, out=d)  # the current box, as a query position
            self.query_content = nn.Parameter(torch.zeros(q, d))
            nn.init.normal_(self.query_content, std=0.02)
            # each query's first box, in logit space: centres spread over the image (set again from
            # the training boxes by init_box_bias)
            if not config.query_selection:  # (with it, the first boxes come from the chosen tokens)
                self.query_anchor = nn.Parameter(_inverse_sigmoid(_spread_boxes(q)))
            self.refine = nn.ModuleList([DecoderBlock(d, config.num_heads, config.dim_feedforward, config.dropout,
                                                      norm_first=True) for _ in range(config.refine_layers)])
            self.deltas = nn.ModuleList([box_head(d, config.head_hidden) for _ in range(config.refine_layers)])
            self.score_heads = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
                                              for _ in range(config.refine_layers)])
            self.exist_head = nn.Linear(d, 1)  # from the fused [REG] token
            if config.query_selection:  # proposals from the last tap's patch tokens
                self.token_score = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
                self.token_box = box_head(d, config.head_hidden)
                self.query_norm = nn.LayerNorm(d)
        else:  # (the order the weights were always drawn in)
            self.head = box_head(d, config.head_hidden)  # the first box, from [REG]
            self.box_embed = MLP(d, d, out=d)  # the current box, as a query position
            self.refine = nn.ModuleList([CrossBlock(d, config.num_heads, config.dim_feedforward, config.dropout)
                                         for _ in range(config.refine_layers)])
            self.deltas = nn.ModuleList([box_head(d, config.head_hidden) for _ in range(config.refine_layers)])
            for delta in self.deltas:  # refinement starts as the identity
                nn.init.zeros_(delta[-1].weight)
                nn.init.zeros_(delta[-1].bias)
        self.confidence_heads(d)
        self._pos_cache: dict[tuple, tuple[Tensor, Tensor]] = {}  # (device, dtype) -> (positions, levels)

    # -- the cacheable image features ------------------------------------------------------

    def level_sizes(self) -> list[int]:
        """Tokens of each tap in :meth:`encode_images`' output, in order: the last tap (prefix
        and patches), then the earlier taps (pooled patches)."""
        pooled = (self.side // self.config.level_pool) ** 2
        return [self.num_prefix + self.side ** 2] + [pooled] * (len(self.layers) - 1)

    def feature_spec(self) -> dict:
        return {"layers": self.layers, "level_pool": self.config.level_pool}

    def image_feature_shape(self) -> tuple[int, int]:
        return sum(self.level_sizes()), encoder_hidden_size(self.image_encoder)

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(I, 3, S, S) -> (I, N, D_img): the taps of :meth:`level_sizes`, concatenated."""
        taps = dinov3_taps(self.image_encoder, pixel_values, self.layers)  # block outputs, before the final norm
        out = [taps[-1]]
        pool = self.config.level_pool
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
            d, side, pooled = self.config.d_model, self.side, self.side // self.config.level_pool
            parts = [torch.cat([torch.zeros(self.num_prefix, d), sine_positions_2d(side, side, d)])]
            parts += [sine_positions_2d(pooled, pooled, d)] * (len(self.layers) - 1)
            positions = torch.cat(parts)
            if self.config.pos_embed == "none":
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
        if self.multi:
            return self._decode_queries(query, memory)
        raw = self.head(query).float().sigmoid()  # (B, 4) cxcywh
        stages = [raw]
        for block, delta in zip(self.refine, self.deltas):
            position = self.box_embed(sine_box_embedding(raw.detach(), self.config.d_model).to(query.dtype))
            query = block(query[:, None], memory, query_pos=position[:, None])[:, 0]  # position: attention only
            raw = (_inverse_sigmoid(raw.detach()) + delta(query).float()).sigmoid()
            stages.append(raw)
        boxes = [self.to_xyxy(s) for s in stages]
        return self.output(query, boxes[-1], aux_boxes=boxes[:-1])

    def _decode_queries(self, reg: Tensor, memory: Tensor) -> GroundingOutput:
        """DETR's decoder on the fused tokens: reg (B, d) the fused [REG], memory (B, N, d)."""
        batch, d = reg.shape
        stages, scores = [], []
        if self.config.query_selection:
            queries, raw, proposals, proposal_scores = self._select_queries(reg, memory)
            stages.append(proposals)
            scores.append(proposal_scores)
        else:
            queries = (reg[:, None] + self.query_content.to(reg.dtype)[None])  # (B, Q, d)
            raw = self.query_anchor.float().sigmoid()[None].expand(batch, -1, -1)  # (B, Q, 4) cxcywh
        no_padding = torch.zeros(queries.shape[:2], dtype=torch.bool, device=reg.device)
        per_phrase = torch.arange(batch, device=reg.device)
        for k, (block, delta, score) in enumerate(zip(self.refine, self.deltas, self.score_heads)):
            position = self.box_embed(sine_box_embedding(raw.detach(), d).to(queries.dtype))
            queries = block(queries, no_padding, memory, per_phrase, query_pos=position)  # position: attention only
            # each layer moves the box it was given (detached: DETR's iterative refinement); the
            # first one's gradient also reaches the queries' first boxes, which are learned
            first = k == 0 and not self.config.query_selection  # selected proposals are trained on their own
            raw = (_inverse_sigmoid(raw if first else raw.detach()) + delta(queries).float()).sigmoid()
            stages.append(self.to_xyxy(raw))
            scores.append(score(queries).squeeze(-1).float())
        exists = self.exist_head(reg).squeeze(-1).float()
        confidence = scores[-1].sigmoid()  # the best box of each phrase, for one-box readers
        best = stages[-1].gather(1, confidence.argmax(1)[:, None, None].expand(-1, 1, 4))[:, 0]
        return GroundingOutput(best, None, tuple(stages[:-1]), stages[-1], scores[-1], exists, tuple(scores[:-1]))

    def _select_queries(self, reg: Tensor, memory: Tensor):
        """The ``num_queries`` patch tokens of the last tap that ``token_score`` rates highest for
        the phrase: their boxes (the token's cell, moved and sized by ``token_box``) start the
        decoder (detached), their fused features plus the [REG] token are its queries. Returns
        (queries (B, Q, d), first boxes (B, Q, 4) cxcywh, the proposals (B, Q, 4) xyxy and their
        score logits (B, Q), trained as one more stage)."""
        start, side = self.num_prefix, self.side
        patches = memory[:, start:start + side * side]  # (B, side^2, d)
        logits = self.token_score(patches).squeeze(-1).float()  # (B, side^2)
        q = min(self.config.num_queries, patches.shape[1])
        top = logits.topk(q, dim=1).indices  # (B, Q)
        chosen = patches.gather(1, top[..., None].expand(-1, -1, patches.shape[-1]))  # (B, Q, d)
        rows, cols = top // side, top % side
        cell = torch.stack([(cols + 0.5) / side, (rows + 0.5) / side,
                            torch.full_like(cols, 2, dtype=torch.float32) / side,
                            torch.full_like(rows, 2, dtype=torch.float32) / side], -1).float()
        boxes = (_inverse_sigmoid(cell) + self.token_box(chosen).float()).sigmoid()  # (B, Q, 4) cxcywh
        queries = self.query_norm(chosen.detach()) + reg[:, None] + self.query_content[:q].to(reg.dtype)[None]
        return queries, boxes.detach(), self.to_xyxy(boxes), logits.gather(1, top)

    @torch.no_grad()
    def init_box_bias(self, mean_box_xyxy: Tensor) -> None:
        """One-box: the first box starts at the mean training box. Multi-box: the queries' first
        boxes take the mean box's size, their centres spread over the image (with query selection
        they come from the chosen tokens: nothing to set)."""
        if not self.multi:
            return super().init_box_bias(mean_box_xyxy)
        if self.config.query_selection:
            return
        mean = box_ops.box_xyxy_to_cxcywh(mean_box_xyxy.float().clamp(0.0, 1.0))
        anchors = _spread_boxes(self.config.num_queries)
        anchors[:, 2:] = mean[2:].clamp(0.02, 0.98)
        self.query_anchor.copy_(_inverse_sigmoid(anchors).to(self.query_anchor.dtype))


def _spread_boxes(count: int) -> Tensor:
    """``count`` (cx, cy, w, h) boxes whose centres cover the image (a Halton sequence), 0.2 wide."""
    def halton(i: int, base: int) -> float:
        f, r = 1.0, 0.0
        while i > 0:
            f /= base
            r += f * (i % base)
            i //= base
        return r

    centres = torch.tensor([[halton(i + 1, 2), halton(i + 1, 3)] for i in range(count)])
    return torch.cat([0.1 + 0.8 * centres, torch.full((count, 2), 0.2)], 1)
