"""Errors injected into referring annotations: what the label-error score is fitted on, and what
the benchmark measures it with.

Four kinds, as Ref-L4's review of RefCOCO found them (non-unique or misaligned phrases, inaccurate
boxes, phrases of nothing) and as they can be made from the annotations alone:

- ``wrong_object``: the box moved to another object of the same image;
- ``bad_box``: the box shifted and rescaled by 35-60% of its size;
- ``no_target``: the phrase replaced by one of an object the image lacks (by the phrase's referent
  kind, or its category, against the image's);
- ``swapped_phrase``: the phrase swapped with another object's phrase in the same image.

"Another object of the image" is another annotated box of that image (IoU < 0.3 with this one),
or one of ``objects`` where the caller knows the scene (the synthetic benchmark). A kind that an
annotation cannot take (an image with one object) is not forced on it: another kind is drawn.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..data.records import GroundingRecords
from ..errors import InputError
from ..models.boxes import box_iou, clip_box_to_image

KINDS = ("wrong_object", "bad_box", "no_target", "swapped_phrase")
DISTINCT_IOU = 0.3  # two annotated boxes below this IoU are two objects
SHIFT_RANGE = (0.35, 0.6)  # bad_box: shift and rescale by this share of the box's size


@dataclass(frozen=True)
class Corruption:
    """What one injected error made of record ``index``."""

    index: int
    kind: str
    phrase: str
    box: tuple  # normalized xyxy


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    return float(box_iou(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)))


class _Images:
    """Each image's rows, objects and kinds, read once from the records."""

    def __init__(self, records: GroundingRecords, objects: Optional[dict] = None):
        self.rows = defaultdict(list)
        for i, path in enumerate(records.filepaths):
            self.rows[path].append(i)
        self.records = records
        self.objects = {}
        for path, rows in self.rows.items():
            boxes = [list(b) for b in (objects or {}).get(path, [])]
            for i in rows:
                if all(_iou(records.boxes[i], b) < DISTINCT_IOU for b in boxes):
                    boxes.append(list(records.boxes[i]))
            self.objects[path] = boxes
        cats = records.categories or [None] * len(records)
        given = records.image_kinds or [None] * len(records)
        self.kinds = {}
        for path, rows in self.rows.items():
            known = next((given[i] for i in rows if given[i] is not None), None)
            self.kinds[path] = set(known) if known is not None else {cats[i] for i in rows if cats[i] is not None}
        self.categories = cats
        self.paths = list(self.rows)

    def other_objects(self, i: int) -> list:
        box = self.records.boxes[i]
        return [b for b in self.objects[self.records.filepaths[i]] if _iou(box, b) < DISTINCT_IOU]

    def other_phrases(self, i: int) -> list[str]:
        r = self.records
        return [r.phrases[j] for j in self.rows[r.filepaths[i]]
                if j != i and _iou(r.boxes[i], r.boxes[j]) < DISTINCT_IOU and r.phrases[j] != r.phrases[i]]

    def absent_phrase(self, i: int, rng: np.random.Generator) -> Optional[str]:
        """A phrase of another image whose referent kind this image lacks (None: none found in a
        few draws, or the kinds are unknown)."""
        r = self.records
        here = self.kinds[r.filepaths[i]]
        if not here:
            return None
        for _ in range(20):
            path = self.paths[rng.integers(len(self.paths))]
            j = self.rows[path][rng.integers(len(self.rows[path]))]
            if path != r.filepaths[i] and self.categories[j] is not None and self.categories[j] not in here:
                return r.phrases[j]
        return None


def _bad_box(box: Sequence[float], rng: np.random.Generator) -> tuple:
    """The box shifted along a random direction and rescaled, each by 35-60% of its size."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    angle = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(*SHIFT_RANGE)
    scale = 1 + rng.choice([-1, 1]) * rng.uniform(*SHIFT_RANGE)
    cx, cy = (x0 + x1) / 2 + np.cos(angle) * shift * w, (y0 + y1) / 2 + np.sin(angle) * shift * h
    nw, nh = w * scale, h * scale
    return tuple(clip_box_to_image([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2]))


def _corrupt(images: _Images, i: int, kind: str, rng: np.random.Generator) -> Optional[Corruption]:
    r = images.records
    phrase, box = r.phrases[i], tuple(r.boxes[i])
    if kind == "wrong_object":
        others = images.other_objects(i)
        return Corruption(i, kind, phrase, tuple(others[rng.integers(len(others))])) if others else None
    if kind == "bad_box":
        return Corruption(i, kind, phrase, _bad_box(box, rng))
    if kind == "no_target":
        absent = images.absent_phrase(i, rng)
        return Corruption(i, kind, absent, box) if absent else None
    if kind == "swapped_phrase":
        others = images.other_phrases(i)
        return Corruption(i, kind, others[rng.integers(len(others))], box) if others else None
    raise InputError(f"Unknown error kind {kind!r}; choose from {KINDS}")


def plan_corruptions(records: GroundingRecords, rows: Sequence[int], rng: np.random.Generator,
                     kinds: Sequence[str] = KINDS, objects: Optional[dict] = None) -> list[Corruption]:
    """One corruption of each record of ``rows``, its kind drawn evenly from ``kinds`` (another
    where the drawn one cannot be made there; a record that can take none is left out).
    ``objects``: filepath -> every object's box where the caller knows the scene."""
    images = _Images(records, objects)
    made = []
    for i in rows:
        for kind in rng.permutation(list(kinds)):
            corruption = _corrupt(images, int(i), str(kind), rng)
            if corruption is not None:
                made.append(corruption)
                break
    return made


def choose_rows(records: GroundingRecords, rate: float, rng: np.random.Generator) -> np.ndarray:
    """A random ``rate`` share of the records' rows (sorted)."""
    if not 0 < rate < 1:
        raise InputError(f"The error rate must be in (0, 1), got {rate!r}")
    count = max(1, int(round(rate * len(records))))
    return np.sort(rng.choice(len(records), size=min(count, len(records)), replace=False))


def with_corrupted_copies(records: GroundingRecords, corruptions: Sequence[Corruption]) -> tuple:
    """The records followed by one corrupted copy per corruption (the copy keeps its original's
    sample id, image and kinds), and each row's kind ("" for the originals)."""
    both = records.take(list(range(len(records))) + [c.index for c in corruptions])
    both.phrases[len(records):] = [c.phrase for c in corruptions]
    both.boxes[len(records):] = [list(c.box) for c in corruptions]
    return both, [""] * len(records) + [c.kind for c in corruptions]


def write_corruptions(view, records: GroundingRecords, corruptions: Sequence[Corruption],
                      phrase_field: str = "expression", gt_field: str = "ground_truth") -> dict:
    """Make the corruptions real in ``view``'s annotations (to measure a flagger on them: the
    benchmark, the tests): each corrupted sample's phrase and box replaced in bulk. Returns each
    record's sample id -> its injected kind ("" where untouched)."""
    from ..data.labels import make_detections

    kinds = {sid: "" for sid in records.sample_ids}
    phrases, boxes = {}, {}
    for c in corruptions:
        sid = records.sample_ids[c.index]
        kinds[sid], phrases[sid] = c.kind, c.phrase
        boxes[sid] = make_detections(list(c.box), c.phrase)
    view.set_values(phrase_field, phrases, key_field="id")
    view.set_values(gt_field, boxes, key_field="id")
    return kinds
