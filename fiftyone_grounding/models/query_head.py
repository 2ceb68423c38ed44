"""The fusion architecture's multi-box head (presets ``fusion-multi``, ``tiny-fusion-multi``):
DETR's decoder on the fused tokens.

Q = ``num_queries`` box queries (learned, plus the fused [REG] token; with ``query_selection``, as
in the multi presets, each query starts from one of the Q fused image tokens that a head rates
most likely to be one of the phrase's objects, with that token's box) through ``refine_layers``
decoder layers (self-attention among the queries, cross-attention to the fused image tokens), each
layer moving every query's box and scoring it; an existence score for the whole phrase comes from
[REG]. Training matches queries to the true boxes by the Hungarian algorithm at every layer
(``losses.py``); a phrase gets every box whose confidence (score x existence) passes
``score_thresh``, none when it refers to nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import boxes as box_ops
from .base import GroundingOutput, box_head
from .config import FusionConfig
from .layers import MLP, DecoderBlock, inverse_sigmoid, sine_box_embedding


class QueryHead:
    """The multi-box box decoder of a ``fusion.FusionGrounder``, as a mixin: its layers are the
    model's own attributes (``box_embed``, ``query_content``, ``query_anchor`` or the query
    selection's ``token_score``, ``token_box``, ``query_norm``; ``refine``, ``deltas``,
    ``score_heads``, ``exist_head``), the names that checkpoints have always had."""

    def build_box_decoder(self, arch: FusionConfig, d: int, head_hidden: int) -> None:
        """The layers, in the order their weights were always drawn in."""
        q = arch.num_queries
        self.box_embed = MLP(d, d, out=d)  # the current box, as a query position
        self.query_content = nn.Parameter(torch.zeros(q, d))
        nn.init.normal_(self.query_content, std=0.02)
        # each query's first box, in logit space: centres spread over the image (set again from
        # the training boxes by init_box_bias)
        if not arch.query_selection:  # (with it, the first boxes come from the chosen tokens)
            self.query_anchor = nn.Parameter(inverse_sigmoid(_spread_boxes(q)))
        self.refine = nn.ModuleList([DecoderBlock(d, arch.num_heads, arch.dim_feedforward, arch.dropout,
                                                  norm_first=True) for _ in range(arch.refine_layers)])
        self.deltas = nn.ModuleList([box_head(d, head_hidden) for _ in range(arch.refine_layers)])
        self.score_heads = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
                                          for _ in range(arch.refine_layers)])
        self.exist_head = nn.Linear(d, 1)  # from the fused [REG] token
        if arch.query_selection:  # proposals from the last tap's patch tokens
            self.token_score = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))
            self.token_box = box_head(d, head_hidden)
            self.query_norm = nn.LayerNorm(d)

    def decode_boxes(self, reg: Tensor, memory: Tensor) -> GroundingOutput:
        """reg (B, d) the fused [REG] token, memory (B, N, d) the fused image tokens."""
        batch, d = reg.shape
        stages, scores = [], []
        if self.config.arch.query_selection:
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
            first = k == 0 and not self.config.arch.query_selection  # selected proposals are trained on their own
            raw = (inverse_sigmoid(raw if first else raw.detach()) + delta(queries).float()).sigmoid()
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
        q = min(self.config.arch.num_queries, patches.shape[1])
        top = logits.topk(q, dim=1).indices  # (B, Q)
        chosen = patches.gather(1, top[..., None].expand(-1, -1, patches.shape[-1]))  # (B, Q, d)
        rows, cols = top // side, top % side
        cell = torch.stack([(cols + 0.5) / side, (rows + 0.5) / side,
                            torch.full_like(cols, 2, dtype=torch.float32) / side,
                            torch.full_like(rows, 2, dtype=torch.float32) / side], -1).float()
        boxes = (inverse_sigmoid(cell) + self.token_box(chosen).float()).sigmoid()  # (B, Q, 4) cxcywh
        queries = self.query_norm(chosen.detach()) + reg[:, None] + self.query_content[:q].to(reg.dtype)[None]
        return queries, boxes.detach(), self.to_xyxy(boxes), logits.gather(1, top)

    @torch.no_grad()
    def init_box_bias(self, mean_box_xyxy: Tensor) -> None:
        """The queries' first boxes take the mean training box's size, their centres spread over
        the image (with query selection they come from the chosen tokens: nothing to set)."""
        if self.config.arch.query_selection:
            return
        mean = box_ops.box_xyxy_to_cxcywh(box_ops.clip_to_image(mean_box_xyxy.float()))
        anchors = _spread_boxes(self.config.arch.num_queries)
        anchors[:, 2:] = mean[2:].clamp(0.02, 0.98)
        self.query_anchor.copy_(inverse_sigmoid(anchors).to(self.query_anchor.dtype))


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
