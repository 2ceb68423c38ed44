"""What a grounding model knows about an annotation: the signals the label-error score combines.

For each record (an image, a phrase, its annotated box), from one forward pass of a model that did
not train on it:

- ``box``, ``confidence``: the model's own box for the phrase and its confidence, calibrated as
  the apply paths write it (a multi-box model: its most confident box's);
- ``iou``: that box's IoU with the annotation; disagreement is ``confidence x (1 - iou)``: the model
  is sure of a box elsewhere;
- ``given``: how right the model finds the annotated box itself (``GrounderBase.given_box_scores``:
  the quality head read at that box, or a multi-box model's best ``confidence x IoU``; NaN for a
  checkpoint trained before the ``judge`` loss term, whose quality head never learned other boxes);
- ``exists``: the probability that the phrase refers to something in the image (the presence
  head, or a multi-box model's existence score);
- ``ambiguity``: a multi-box model's confidence in a second box away from its best one (IoU < 0.3):
  the phrase fits several objects;
- ``area_ratio``, ``offset``: the annotation's log area over the model box's, and the distance of
  their centres over the model box's size (a moved box against a shifted one).

A signal the model cannot give (no quality head, no presence head, one box) is NaN.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.batching import Collator, GroupBatchSampler
from ..data.cache import default_feature_cache_dir, open_feature_cache
from ..data.datasets import GroundingDataset
from ..data.records import GroundingRecords
from ..models import boxes as box_ops
from ..models.build import build_tokenizer
from ..engine.loop import forward_batch, to_device
from ..models.precision import autocast
from ..progress import TimeLeft

SIGNALS = ("confidence", "iou", "given", "exists", "ambiguity", "area_ratio", "offset")
SECOND_BOX_IOU = 0.3  # a multi-box model's second box counts when it lies this far from its best


@dataclass
class Signals:
    """Per record: the model's box (normalized xyxy) and the signals of :data:`SIGNALS`."""

    boxes: np.ndarray  # (N, 4)
    values: dict = field(default_factory=dict)  # name -> (N,) float, NaN where the model cannot say
    skipped: list = field(default_factory=list)  # (row, reason): unreadable images

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    def take(self, rows) -> "Signals":
        rows = np.asarray(rows, dtype=np.int64)
        return Signals(self.boxes[rows], {k: v[rows] for k, v in self.values.items()})


def _batch_signals(model, out, given_boxes: torch.Tensor) -> dict:
    """The signals of one batch's outputs (already clipped) against its annotated boxes."""
    boxes = out.boxes.float()
    n = boxes.shape[0]
    nan = torch.full((n,), float("nan"))
    judges = out.scores is not None or bool(model.config.loss_weights.get("judge"))
    given = model.given_box_scores(out, given_boxes) if judges else None
    if out.scores is not None:  # multi-box: the best box's confidence; a second box away from it
        conf = torch.from_numpy(model.calibration(out.box_confidence_logits().cpu().numpy())).float()  # (B, Q)
        top = conf.argmax(-1)
        confidence = conf.gather(1, top[:, None])[:, 0]
        best = out.query_boxes.float().cpu()[torch.arange(n), top]
        away = box_ops.box_iou(out.query_boxes.float().cpu(), best[:, None]) < SECOND_BOX_IOU  # (B, Q)
        ambiguity = torch.where(away, conf, torch.zeros_like(conf)).amax(-1)
        boxes = best
        exists = out.exists.float().sigmoid().cpu()
    else:
        logits = out.confidence_logits()
        confidence = (torch.from_numpy(model.calibration(logits.cpu().numpy())).float() if logits is not None
                      else nan)
        ambiguity = nan
        exists = out.exists.float().sigmoid().cpu() if out.exists is not None else nan
        boxes = boxes.cpu()
    annotated = given_boxes.float().cpu()
    area = box_ops.box_area(annotated).clamp(min=1e-6) / box_ops.box_area(boxes).clamp(min=1e-6)
    size = box_ops.box_area(boxes).clamp(min=1e-6).sqrt()
    centre = box_ops.box_xyxy_to_cxcywh(annotated)[:, :2] - box_ops.box_xyxy_to_cxcywh(boxes)[:, :2]
    return {"boxes": boxes,
            "confidence": confidence, "iou": box_ops.box_iou(boxes, annotated),
            "given": given.float().cpu() if given is not None else nan, "exists": exists,
            "ambiguity": ambiguity, "area_ratio": area.log(), "offset": centre.norm(dim=-1) / size}


@torch.no_grad()
def compute_signals(model, records: GroundingRecords, *, device=None, batch_size: int = 64,
                    cache_dir=None, autocast_dtype=None, num_workers: int = 0,
                    on_batch: Optional[Callable[[int], None]] = None) -> Signals:
    """The signals of every record under ``model`` (a ``GrounderBase``, in eval mode on
    ``device``), over the frozen-feature cache where the model can use one (the images encoded
    once, shared with training). ``on_batch(phrases)`` is called after each batch."""
    device = torch.device(device or "cpu")
    model = model.to(device).eval()
    rows = dataclasses.replace(records, sample_ids=[str(i) for i in range(len(records))], targets=None)
    cache = None
    if model.cacheable:
        cache = open_feature_cache(cache_dir or default_feature_cache_dir(), model)
        cache.reload()
        cache.build(sorted(set(rows.filepaths)), model.encode_images, model.config, device, progress=False,
                    autocast_dtype=autocast_dtype)
    config = model.config
    data = GroundingDataset(rows, config.image_size, config.image_mean, config.image_std, feature_cache=cache)
    sampler = GroupBatchSampler(data.group_sizes(), batch_size, shuffle=False, pad=False)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=Collator(build_tokenizer(config), config.max_text_len))
    n = len(records)
    result = Signals(np.full((n, 4), np.nan), {name: np.full(n, np.nan) for name in SIGNALS})
    for batch in loader:
        result.skipped.extend((int(row), reason) for row, reason in batch["skipped"])
        if "boxes" not in batch:
            continue
        index = np.asarray([int(s) for s in batch["sample_ids"]])
        inputs = to_device(batch, device)
        with autocast(device, autocast_dtype):
            out = forward_batch(model, inputs).clipped()
        values = _batch_signals(model, out, inputs["boxes"])
        result.boxes[index] = values.pop("boxes").numpy()
        for name, v in values.items():
            result.values[name][index] = v.numpy()
        if on_batch is not None:
            on_batch(len(index))
    return result


def scoring_progress(total: int, say: Optional[Callable[[str], None]] = None,
                     progress_callback: Optional[Callable[[float, str], None]] = None,
                     start: float = 0.0) -> Callable[[int], None]:
    """An ``on_batch`` that prints the time left once it is known (``progress.TimeLeft``, through
    ``say``) and reports ``(fraction, label)`` to ``progress_callback``, the scoring taking the
    fractions from ``start`` to 1."""
    left = TimeLeft(total, unit="phrases")

    def on_batch(count: int) -> None:
        line = left.add(count)
        if line and say is not None:
            say(f"Scoring: {line}")
        if progress_callback is not None:
            label = f"scoring: {left.done} of {total} phrases"
            progress_callback(start + (1 - start) * min(1.0, left.done / max(total, 1)),
                              label + (f", {left.left()}" if left.left() else ""))

    return on_batch
