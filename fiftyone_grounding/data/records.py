"""FiftyOne view -> torch Dataset / DataLoader for grounding.

Items are *images*, each with all of its phrases and boxes, so an image shared by
several referring expressions is decoded, augmented and encoded once per batch.
The augmentation (``augment.py``) takes and returns image, boxes and phrases together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import CACHEABLE, augment_item, hflip_boxes, parse_augment
from ..models.boxes import fiftyone_xywh_to_xyxy, is_valid_xyxy
from .fields import CATEGORY_FIELD, IMAGE_KINDS_FIELD, NO_TARGET_FIELD, REFERENT_KIND_FIELD
from ..errors import ImageError, InputError
from .images import load_rgb, normalize_pixels, resize_rgb
from .text import NO_PHRASE, PhraseTokenizer, clean_phrase, swap_left_right


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

    def mean_box(self) -> list[float]:
        """The mean of every true box (the box head's starting point)."""
        boxes = [b for t in self.targets for b in t] if self.targets is not None else self.boxes
        return np.asarray(boxes, dtype=np.float64).mean(0).tolist() if boxes else [0.25, 0.25, 0.75, 0.75]


NO_TARGET = "no target (the phrase refers to nothing): one-box models skip it"
SEVERAL_TARGETS = "several targets: one-box models skip them"


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
    for name in (phrase_field, gt_field):
        if not view.has_field(name):
            raise InputError(f"The dataset has no field {name!r}; fields: {sorted(view.get_field_schema())}")
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
            box = fiftyone_xywh_to_xyxy(raw) if raw is not None and len(raw) == 4 else [math.nan] * 4
            if not all(math.isfinite(v) for v in box):
                problem = "box has non-finite coordinates"
                break
            box = [min(max(v, 0.0), 1.0) for v in box]  # partly outside the image: clipped
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


class GroundingDataset(Dataset):
    """One item per image (or per chunk of an image's phrases).

    Returns ``dict(pixel_values (3, S, S) float, boxes (k, 4), phrases [k], sample_ids [k])``,
    or ``dict(skipped=[(sample_id, reason), ...])`` when the image cannot be read. With a
    ``feature_cache`` (see ``cache.py``) it returns cached ``image_features (T, D)`` of the
    original or mirrored view instead of pixels.
    """

    def __init__(
        self,
        records: GroundingRecords,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: str = "none",  # "none", or parts of augment.PARTS joined by "+"
        max_phrases_per_image: int = 32,
        seed: int = 0,
        feature_cache=None,
    ):
        self.parts = parse_augment(augment)
        self.records = records
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        if feature_cache is not None and not self.parts <= CACHEABLE:
            raise InputError(f"Cached features support augment='none' or 'flip' only, not {augment!r}")
        self.feature_cache = feature_cache
        by_image: dict[str, list[int]] = {}
        for i, path in enumerate(records.filepaths):
            by_image.setdefault(path, []).append(i)
        self.groups: list[list[int]] = []
        for indices in by_image.values():
            for start in range(0, len(indices), max_phrases_per_image):
                self.groups.append(indices[start:start + max_phrases_per_image])

    def __len__(self) -> int:
        return len(self.groups)

    def group_sizes(self) -> list[int]:
        return [len(g) for g in self.groups]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index) -> dict:
        """``index``: an item number, or ``(epoch, item number)`` from a sampler that tags its
        batches with the epoch (``GroupBatchSampler(tag_epoch=True)``): persistent DataLoader
        workers hold a copy of this dataset made before ``set_epoch``, so the epoch must
        travel with the index."""
        epoch = self.epoch
        if isinstance(index, tuple):
            epoch, index = index
        rows = self.groups[index]
        r = self.records
        ids = [r.sample_ids[i] for i in rows]
        if self.feature_cache is not None:
            return self._cached_item(index, rows, ids, epoch)
        try:
            image = load_rgb(r.filepaths[rows[0]])
        except ImageError as e:
            return {"skipped": [(sid, str(e)) for sid in ids]}
        boxes, sizes = self._boxes(rows)
        phrases = [r.phrases[i] for i in rows]
        # Per-item randomness from (seed, epoch, index): the same augmentation whatever
        # the number of workers or processes, so a resumed run repeats itself exactly.
        rng = np.random.default_rng([self.seed, epoch, index])
        image, boxes, phrases, kept, area = augment_item(image, boxes, phrases, self.parts, rng, sizes)
        rows, ids = [rows[k] for k in kept], [ids[k] for k in kept]  # a crop may leave phrases out
        sizes = None if sizes is None else [sizes[k] for k in kept]
        item = {
            "pixel_values": normalize_pixels(resize_rgb(image, self.image_size), self.mean, self.std),  # (3, S, S)
            **self._box_fields(boxes, sizes),
            **self._phrase_fields(rows, phrases, ids),
        }
        if "scale" in self.parts:
            item["crop_area"] = area
        return item

    def _phrase_fields(self, rows: list[int], phrases: list[str], ids: list[str]) -> dict:
        """The phrases of an item, their sample ids and referent kinds, the kinds of object its
        image holds (None: unknown) and its image's path."""
        r = self.records
        categories = [r.categories[i] for i in rows] if r.categories else [None] * len(rows)
        kinds = r.image_kinds[rows[0]] if r.image_kinds else None
        return {"phrases": phrases, "sample_ids": ids, "categories": categories, "image_kinds": kinds,
                "image": r.filepaths[rows[0]]}

    def _boxes(self, rows: list[int]) -> tuple[np.ndarray, Optional[list[int]]]:
        """The boxes of these phrases as one (M, 4) array (what augmentation moves), and how many
        belong to each phrase (None: one each)."""
        r = self.records
        if r.targets is None:
            return np.asarray([r.boxes[i] for i in rows], dtype=np.float32), None
        sizes = [len(r.targets[i]) for i in rows]
        return np.asarray([b for i in rows for b in r.targets[i]], dtype=np.float32).reshape(-1, 4), sizes

    @staticmethod
    def _box_fields(boxes: np.ndarray, sizes: Optional[list[int]]) -> dict:
        """``boxes`` (k, 4): each phrase's first box (NaN where it has none); with several boxes
        per phrase also ``targets``, each phrase's (g, 4) boxes."""
        if sizes is None:
            return {"boxes": torch.from_numpy(boxes)}
        targets = [torch.from_numpy(t) for t in np.split(boxes, np.cumsum(sizes)[:-1])]
        first = torch.stack([t[0] if len(t) else torch.full((4,), float("nan")) for t in targets])
        return {"boxes": first, "targets": targets}


    def _cached_item(self, index: int, rows: list[int], ids: list[str], epoch: int) -> dict:
        r = self.records
        path = r.filepaths[rows[0]]
        error = self.feature_cache.error(path)
        if error is not None or path not in self.feature_cache:
            return {"skipped": [(sid, error or "image not in the feature cache") for sid in ids]}
        boxes, sizes = self._boxes(rows)
        phrases = [r.phrases[i] for i in rows]
        rng = np.random.default_rng([self.seed, epoch, index])
        view = int("flip" in self.parts and rng.random() < 0.5)
        if view:  # the mirrored view was encoded from mirrored pixels
            boxes, phrases = hflip_boxes(boxes), [swap_left_right(p) for p in phrases]
        return {
            "image_features": self.feature_cache.get(path, view),  # (T, D) float16
            **self._box_fields(boxes, sizes),
            **self._phrase_fields(rows, phrases, ids),
        }


class Collator:
    """Stacks images once, tokenizes phrases (or reads their cached text features), and maps
    each phrase to its image."""

    def __init__(self, tokenizer, max_text_len: int, text_cache=None):
        self.tokenize = PhraseTokenizer(tokenizer, max_text_len)
        self.text_cache = text_cache

    def __call__(self, items: list[dict]) -> dict:
        skipped = [s for it in items for s in it.get("skipped", [])]
        items = [it for it in items if "skipped" not in it]
        batch = {"skipped": skipped, "sample_ids": [s for it in items for s in it["sample_ids"]]}
        if not items:
            return batch
        phrases = [p for it in items for p in it["phrases"]]
        if self.text_cache is not None:
            feats = [self.text_cache.get(p) for p in phrases]  # (L_i, D) each
            text = {"text_features": torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),  # (B, L, D)
                    "attention_mask": torch.nn.utils.rnn.pad_sequence(
                        [torch.ones(len(f), dtype=torch.long) for f in feats], batch_first=True)}
        else:
            tokens = self.tokenize(phrases)
            text = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        image_key = "image_features" if "image_features" in items[0] else "pixel_values"
        batch.update(
            # (I, 3, S, S) pixels, or (I, T, D) cached features
            **{image_key: torch.stack([it[image_key] for it in items])},
            image_index=torch.cat([torch.full((len(it["phrases"]),), i, dtype=torch.long)
                                   for i, it in enumerate(items)]),  # (B,)
            boxes=torch.cat([it["boxes"] for it in items]),  # (B, 4)
            phrases=phrases,
            **text,
        )
        if "targets" in items[0]:
            batch["targets"] = [t for it in items for t in it["targets"]]  # B tensors (g, 4)
        batch["categories"] = [c for it in items for c in it.get("categories", [None] * len(it["phrases"]))]
        batch["images"] = [it.get("image") for it in items]  # (I,) the image of each row of the image tensor
        batch["image_kinds"] = [it.get("image_kinds") for it in items]  # (I,) the kinds each image holds
        if "crop_area" in items[0]:
            batch["crop_areas"] = [it["crop_area"] for it in items]
        return batch


def add_absent_pairs(batch: dict, share: float, rng: np.random.Generator) -> dict:
    """The batch with a ``share`` of its phrases shown once more, each with another image of the
    batch that lacks its referent, so that the confidence learns that the object is not there: a
    phrase's object is absent from most of the images a search ranks, and one-box training data
    (RefCOCO) has no such phrase. An image lacks a phrase's referent when it holds no object of the
    kind the phrase names (``categories``: ``referent_kind`` or ``category``), judged by the kinds
    the image holds (``image_kinds``, every object's) or, where the data does not say, by the kinds
    of the image's own phrases in the batch; a phrase of unknown kind goes with any other image.
    The added rows have a NaN box and ``absent`` True; the first B rows are the batch's own
    (``absent`` False)."""
    phrases = batch.get("phrases") or []
    image_index = batch["image_index"]
    num_images = int(image_index.max()) + 1 if len(phrases) else 0
    if share <= 0 or num_images < 2:
        return batch
    image_of = image_index.tolist()
    categories = batch.get("categories") or [None] * len(phrases)
    image_kinds = batch.get("image_kinds") or [None] * num_images
    held: dict[int, set] = {i: set(kinds) for i, kinds in enumerate(image_kinds) if kinds is not None}
    for b, i in enumerate(image_of):
        if categories[b] is not None and image_kinds[i] is None:
            held.setdefault(i, set()).add(categories[b])
    count = max(1, int(round(share * len(phrases))))
    rows, images = [], []
    for b in rng.permutation(len(phrases))[:count].tolist():
        others = [i for i in range(num_images)
                  if i != image_of[b] and (categories[b] is None or categories[b] not in held.get(i, ()))]
        if not others:
            continue
        # the hardest: an image whose kinds share the most words with the phrase's ("the yellow
        # triangle" with an image of a red triangle and a yellow circle), ties at random
        words = set(categories[b].split()) if categories[b] else set()
        near = [len(words & {w for kind in held.get(i, ()) for w in kind.split()}) for i in others]
        hardest = [i for i, n in zip(others, near) if n == max(near)]
        rows.append(b)
        images.append(hardest[int(rng.integers(len(hardest)))])
    if not rows:
        return batch
    index = torch.tensor(rows, dtype=torch.long)
    out = dict(batch)
    for key in ("input_ids", "text_features", "attention_mask"):
        if key in batch:
            out[key] = torch.cat([batch[key], batch[key].index_select(0, index)])
    out["image_index"] = torch.cat([image_index, torch.tensor(images, dtype=image_index.dtype)])
    out["boxes"] = torch.cat([batch["boxes"], batch["boxes"].new_full((len(rows), 4), float("nan"))])
    out["absent"] = torch.cat([torch.zeros(len(phrases), dtype=torch.bool), torch.ones(len(rows), dtype=torch.bool)])
    out["phrases"] = list(phrases) + [phrases[b] for b in rows]
    return out
