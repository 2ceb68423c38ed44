"""FiftyOne view -> training records: each usable sample's id, image, phrase and boxes, checked,
and why each other sample was skipped (:func:`read_records`, one bulk read).

``datasets.py`` turns the records into items (images with their phrases), ``batching.py`` items
into batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import InputError
from ..models.boxes import clip_box_to_image, is_valid_xyxy
from .fields import CATEGORY_FIELD, IMAGE_KINDS_FIELD, NO_TARGET_FIELD, REFERENT_KIND_FIELD
from .labels import detection_xyxy
from .text import NO_PHRASE, clean_phrase


@dataclass
class GroundingRecords:
    """The rows of a view that can be trained on, and why the others were skipped."""

    sample_ids: list[str] = field(default_factory=list)
    filepaths: list[str] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)  # normalized xyxy (the first box; NaN: none)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)
    # every true box of each phrase (read with several=True): zero, one or several
    targets: Optional[list[list[list[float]]]] = None
    # each phrase's referent kind (``referent_kind``, else ``category``; None: unknown) and every
    # kind its image holds (``image_kinds``; None: unknown): training pairs a phrase with an image
    # that lacks its referent by these (add_absent_pairs)
    categories: Optional[list[Optional[str]]] = None
    image_kinds: Optional[list[Optional[list[str]]]] = None
    # phrases with more true boxes than a multi-box model has queries (read with max_boxes)
    over_capacity: int = 0

    def __len__(self) -> int:
        return len(self.sample_ids)

    def take(self, rows) -> "GroundingRecords":
        """The records of ``rows`` (in that order; a row may repeat), without the skipped list."""
        rows = [int(i) for i in rows]

        def pick(values):
            return None if values is None else [values[i] for i in rows]

        return GroundingRecords(sample_ids=pick(self.sample_ids), filepaths=pick(self.filepaths),
                                phrases=pick(self.phrases), boxes=pick(self.boxes), targets=pick(self.targets),
                                categories=pick(self.categories), image_kinds=pick(self.image_kinds))

    def mean_box(self) -> list[float]:
        """The mean of every true box (the box head's starting point)."""
        boxes = [b for t in self.targets for b in t] if self.targets is not None else self.boxes
        return np.asarray(boxes, dtype=np.float64).mean(0).tolist() if boxes else [0.25, 0.25, 0.75, 0.75]


NO_TARGET = "no target (the phrase refers to nothing): one-box models skip it"
SEVERAL_TARGETS = "several targets: one-box models skip them"


def require_fields(view, names) -> None:
    """Refuse a view whose dataset lacks any of the fields ``names``, naming the fields it has."""
    for name in names:
        if not view.has_field(name):
            raise InputError(f"The dataset has no field {name!r}; fields: {sorted(view.get_field_schema())}")


def read_records(view, phrase_field: str = "expression", gt_field: str = "ground_truth",
                 several: bool = False, max_boxes: Optional[int] = None) -> GroundingRecords:
    """Bulk-read (id, filepath, phrase, box) from a FiftyOne view, validating each row.

    One-box models predict one box per phrase, so by default a sample whose ground truth holds
    several boxes, or none because its phrase refers to nothing (``no_target``, gRefCOCO), is
    skipped with its reason, not trained on with a box that is not the whole answer. With
    ``several=True`` (multi-box models) they are read too, every box into ``targets`` (none for a
    no-target phrase); a sample with no box that is not marked ``no_target`` is still skipped.
    ``max_boxes``: count the phrases with more true boxes than that (a multi-box model's queries:
    each of its queries takes one box, so such a phrase can never be found whole) in
    ``over_capacity``. What tells an image that lacks a phrase's referent is read where the view has
    it: ``referent_kind`` (else ``category``) into ``categories``, ``image_kinds`` into ``image_kinds``.
    """
    require_fields(view, (phrase_field, gt_field))
    ids, paths, phrases, bbs = view.values(
        ["id", "filepath", phrase_field, f"{gt_field}.detections.bounding_box"]
    )
    no_target = view.values(NO_TARGET_FIELD) if view.has_field(NO_TARGET_FIELD) else [None] * len(ids)
    kind_field = next((f for f in (REFERENT_KIND_FIELD, CATEGORY_FIELD) if view.has_field(f)), None)
    categories = view.values(kind_field) if kind_field else [None] * len(ids)
    image_kinds = view.values(IMAGE_KINDS_FIELD) if view.has_field(IMAGE_KINDS_FIELD) else [None] * len(ids)
    records = GroundingRecords(targets=[] if several else None, categories=[], image_kinds=[])
    for sid, path, phrase, boxes, nothing, category, kinds in zip(ids, paths, phrases, bbs, no_target, categories,
                                                                  image_kinds):
        text = clean_phrase(phrase)
        if text is None:
            records.skipped.append((sid, NO_PHRASE))
            continue
        if nothing and not several:
            records.skipped.append((sid, NO_TARGET))
            continue
        boxes = [] if nothing else (boxes or [])
        if not boxes and not nothing:
            records.skipped.append((sid, f"no box in {gt_field!r}"))
            continue
        if len(boxes) > 1 and not several:
            records.skipped.append((sid, SEVERAL_TARGETS))
            continue
        clean, problem = [], None
        for raw in boxes:
            box = detection_xyxy(raw) or [math.nan] * 4
            if not all(math.isfinite(v) for v in box):
                problem = "box has non-finite coordinates"
                break
            box = clip_box_to_image(box)  # partly outside the image: clipped
            if not is_valid_xyxy(box):
                problem = "box has zero or negative area"
                break
            clean.append(box)
        if problem is not None:
            records.skipped.append((sid, problem))
            continue
        records.sample_ids.append(sid)
        records.filepaths.append(path)
        records.phrases.append(text)
        records.boxes.append(clean[0] if clean else [math.nan] * 4)
        records.categories.append(category if isinstance(category, str) else None)
        records.image_kinds.append(list(kinds) if isinstance(kinds, (list, tuple)) else None)
        if several:
            records.targets.append(clean)
            records.over_capacity += max_boxes is not None and len(clean) > max_boxes
    return records
