"""The fusion architecture's one-box head (presets ``fusion``, ``tiny-fusion``): the fused [REG]
token -> a first box; ``CrossBlock`` layers refine it (DETR's iterative refinement: each layer
reads the fused image tokens at the current box and moves it; every stage's box is trained: deep
supervision) -> the box and its quality.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import GroundingOutput, box_head
from .config import FusionConfig
from .layers import MLP, CrossBlock, inverse_sigmoid, sine_box_embedding


class RefineHead:
    """The one-box box decoder of a ``fusion.FusionGrounder``, as a mixin: its layers are the
    model's own attributes (``head``, ``box_embed``, ``refine``, ``deltas``), the names that
    checkpoints have always had."""

    def build_box_decoder(self, arch: FusionConfig, d: int, head_hidden: int) -> None:
        """The layers, in the order their weights were always drawn in."""
        self.head = box_head(d, head_hidden)  # the first box, from [REG]
        self.box_embed = MLP(d, d, out=d)  # the current box, as a query position
        self.refine = nn.ModuleList([CrossBlock(d, arch.num_heads, arch.dim_feedforward, arch.dropout)
                                     for _ in range(arch.refine_layers)])
        self.deltas = nn.ModuleList([box_head(d, head_hidden) for _ in range(arch.refine_layers)])
        for delta in self.deltas:  # refinement starts as the identity
            nn.init.zeros_(delta[-1].weight)
            nn.init.zeros_(delta[-1].bias)

    def decode_boxes(self, query: Tensor, memory: Tensor) -> GroundingOutput:
        """query (B, d) the fused [REG] token, memory (B, N, d) the fused image tokens."""
        raw = self.head(query).float().sigmoid()  # (B, 4) cxcywh
        stages = [raw]
        for block, delta in zip(self.refine, self.deltas):
            position = self.box_embed(sine_box_embedding(raw.detach(), self.config.arch.d_model).to(query.dtype))
            query = block(query[:, None], memory, query_pos=position[:, None])[:, 0]  # position: attention only
            raw = (inverse_sigmoid(raw.detach()) + delta(query).float()).sigmoid()
            stages.append(raw)
        boxes = [self.to_xyxy(s) for s in stages]
        return self.output(query, boxes[-1], aux_boxes=boxes[:-1])
