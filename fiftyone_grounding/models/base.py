"""What every grounding network shares: the frozen encoders, the text encoding, the box head and
its format, the quality head, the confidence's calibration, and the output type.

The architectures build on :class:`GrounderBase`: ``decoder.Grounder`` (``decoder``),
``fusion.FusionGrounder`` (``fusion``), ``adapter.AdapterGrounder`` (``adapter``); ``build.build_model``
picks one from ``GrounderConfig.architecture``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import boxes as box_ops
from .calibration import Calibration
from .config import GrounderConfig
from .encoders import encoder_hidden_size, num_prefix_tokens, patch_size
from ..errors import ConfigError


class GroundingOutput(NamedTuple):
    """What a model returns for B phrases.

    One-box models fill ``boxes`` (and ``quality``). Multi-box models (``num_queries`` Q > 0)
    fill ``query_boxes`` and ``scores`` (each query's box and the logit of its being one of the
    phrase's objects), ``exists`` (the logit of the phrase's referring to anything), and
    ``boxes`` with each phrase's best box; their earlier stages are ``aux_boxes`` (B, Q, 4) and
    ``aux_scores`` (B, Q)."""

    boxes: Tensor  # (B, 4) normalized xyxy, not clipped to the image (see clipped())
    quality: Optional[Tensor] = None  # (B,) logits of each box's predicted IoU; None without a quality head
    aux_boxes: tuple = ()  # (B, 4) xyxy boxes of the earlier refinement stages (deep supervision)
    query_boxes: Optional[Tensor] = None  # (B, Q, 4) xyxy
    scores: Optional[Tensor] = None  # (B, Q) logits
    # (B,) logits that the phrase refers to something here: multi-box models, and one-box models
    # with a presence head (their phrase's object is in the image); None otherwise
    exists: Optional[Tensor] = None
    aux_scores: tuple = ()  # (B, Q) logits of the earlier stages
    # (B, D) the query that made each one-box model's box: the quality head reads it to judge any
    # other box for the phrase (GrounderBase.given_box_scores); None for multi-box models
    query: Optional[Tensor] = None
    # training: (B, K, 4) other boxes for each phrase (losses.judge_boxes) and the quality head's
    # logits of them (B, K), for the "judge" loss term
    judge_boxes: Optional[Tensor] = None
    judged: Optional[Tensor] = None

    def clipped(self) -> "GroundingOutput":
        """The boxes clipped to the image, as post-processing writes them (what metrics and
        labels read). The model's own boxes may reach past the border: the losses see them
        unclipped, so that a corner outside the image still gets a gradient (DETR clamps only
        in post-processing)."""
        clip = box_ops.clip_to_image
        return self._replace(boxes=clip(self.boxes), aux_boxes=tuple(clip(b) for b in self.aux_boxes),
                             query_boxes=None if self.query_boxes is None else clip(self.query_boxes))

    def confidence_logits(self) -> Optional[Tensor]:
        """(B,) logits of a one-box output's confidence before calibration: the predicted IoU,
        times P(present) where the model has a presence head; None without a quality head."""
        if self.quality is None:
            return None
        if self.exists is None:
            return self.quality.float()
        both = self.quality.float().sigmoid() * self.exists.float().sigmoid()
        return torch.logit(both.clamp(1e-6, 1 - 1e-6))

    def box_confidences(self) -> Optional[Tensor]:
        """(B, Q) probabilities of a multi-box output: P(the phrase refers to something) x
        P(this box is one of its objects); None for one-box outputs."""
        if self.scores is None:
            return None
        return self.scores.float().sigmoid() * self.exists.float().sigmoid()[:, None]

    def box_confidence_logits(self) -> Optional[Tensor]:
        """(B, Q) logits of :meth:`box_confidences` (what a checkpoint's calibration maps to the
        confidence); None for one-box outputs."""
        if self.scores is None:
            return None
        return torch.logit(self.box_confidences().clamp(1e-6, 1 - 1e-6))


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


def presence_head(dim: int) -> nn.Sequential:
    """LayerNorm -> Linear(1): the logit that the phrase's object is in the image, from the query
    itself (not detached: telling present from absent is the fusion's work too)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))


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
        if config.image_size % self.patch_size:
            raise ConfigError(f"image_size {config.image_size} is not a multiple of the image encoder's patch size "
                              f"({self.patch_size} px): the encoder would drop a border strip of the image; use "
                              f"{config.image_size // self.patch_size * self.patch_size} or "
                              f"{(config.image_size // self.patch_size + 1) * self.patch_size}")
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
        judge_boxes: Optional[Tensor] = None,
    ) -> GroundingOutput:
        """Boxes for phrases over images, each given as model inputs (pixels, token ids) or as
        cached frozen-encoder features; ``image_index`` (B,) maps each phrase to its image
        (default: phrase i -> image i), so an image shared by several phrases is encoded once.
        ``judge_boxes`` (B, K, 4), training: other boxes for the quality head to judge (inside the
        forward, so that distributed training sees every use of the head)."""
        if image_features is None:
            image_features = self.encode_images(pixel_values)
        if text_features is None:
            text_features = self.encode_text(input_ids, attention_mask)
        if image_index is None:
            image_index = torch.arange(text_features.shape[0], device=text_features.device)
        return self.judge(self.decode(image_features, text_features, attention_mask, image_index), judge_boxes)

    def judge(self, out: GroundingOutput, judge_boxes: Optional[Tensor]) -> GroundingOutput:
        """``out`` with the quality head's logits of ``judge_boxes`` (B, K, 4), for the "judge"
        loss term (a one-box model with a quality head; ``out`` unchanged otherwise)."""
        if judge_boxes is None or out.query is None or self.quality_head is None:
            return out
        k = judge_boxes.shape[1]
        judged = self.quality_head(out.query[:, None].expand(-1, k, -1), box_ops.box_xyxy_to_cxcywh(judge_boxes))
        return out._replace(judge_boxes=judge_boxes, judged=judged)  # judged: (B, K)

    def decode(self, image_features: Tensor, text_features: Tensor, attention_mask: Tensor,
               image_index: Optional[Tensor] = None) -> GroundingOutput:
        raise NotImplementedError

    # -- boxes ---------------------------------------------------------------------------

    @property
    def has_confidence(self) -> bool:
        """Whether its boxes carry a confidence to calibrate: a quality head, or box queries with
        scores (the seed has neither)."""
        return self.quality_head is not None or self.config.num_queries > 0

    def to_xyxy(self, raw: Tensor) -> Tensor:
        """Sigmoid outputs of the box head -> xyxy, not clipped: a (cx, cy, w, h) box may reach
        past the image's border, and the loss must see it so (``GroundingOutput.clipped``)."""
        if self.config.box_format == "cxcywh":
            return box_ops.box_cxcywh_to_xyxy(raw)
        # The seed's head predicts corners directly; order them so the box is valid.
        x0, y0, x1, y1 = raw.unbind(-1)
        return torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1),
                            torch.maximum(x0, x1), torch.maximum(y0, y1)], dim=-1)

    def confidence_heads(self, dim: int) -> None:
        """The heads of a one-box model's confidence, on queries of width ``dim``: the quality
        head (its box's IoU) and the presence head (its phrase's object is here at all)."""
        self.quality_head = QualityHead(dim, self.config.head_hidden) if self.config.quality_head else None
        self.presence_head = presence_head(dim) if self.config.presence_head else None

    def output(self, query: Tensor, boxes: Tensor, aux_boxes: tuple = ()) -> GroundingOutput:
        """The output of B phrases: their boxes, the quality head's judgement of them and the
        presence head's of the phrase."""
        quality = exists = None
        if self.quality_head is not None:
            quality = self.quality_head(query, box_ops.box_xyxy_to_cxcywh(boxes))
        if self.presence_head is not None:
            exists = self.presence_head(query).squeeze(-1).float()  # (B,)
        return GroundingOutput(boxes, quality, tuple(aux_boxes), exists=exists, query=query)

    @torch.no_grad()
    def given_box_scores(self, out: GroundingOutput, boxes_xyxy: Tensor) -> Optional[Tensor]:
        """(B,) how right the model finds a given box for each phrase (e.g. its annotation), in
        [0, 1], from the output ``out`` of those phrases: a one-box model's quality head read at
        that box (its predicted IoU of the box with the phrase's object: the same head, the same
        query, another box); a multi-box model's best ``confidence x IoU`` of its boxes with the
        given one (a box query that found it, and how surely). None for a model with neither (the
        seed). ``boxes_xyxy``: (B, 4) normalized."""
        if out.query is not None and self.quality_head is not None:
            return self.quality_head(out.query, box_ops.box_xyxy_to_cxcywh(boxes_xyxy.to(out.query.dtype))).sigmoid()
        if out.query_boxes is not None:
            ious = box_ops.box_iou(out.query_boxes.float(), boxes_xyxy.float()[:, None])  # (B, Q), broadcast
            return (out.box_confidences() * ious).amax(-1)
        return None

    @torch.no_grad()
    def init_box_bias(self, mean_box_xyxy: Tensor) -> None:
        """Start the box head at the mean training box (its bias in logit space, DETR-style
        prior) instead of a centered half-image box, which the loss takes hundreds of steps
        to unlearn."""
        box = box_ops.clip_to_image(mean_box_xyxy.float())
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
