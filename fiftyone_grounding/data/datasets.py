"""Training records -> a torch ``Dataset`` of grounding items.

Items are *images*, each with all of its phrases and boxes, so an image shared by several
referring expressions is decoded, augmented and encoded once per batch. The augmentation
(``augment.py``) takes and returns image, boxes and phrases together; with a feature cache
(``cache.py``) an item holds the image's cached features instead of pixels.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ImageError, InputError
from .augment import CACHEABLE, augment_item, hflip_boxes, parse_augment
from .images import load_rgb, normalize_pixels, resize_rgb
from .records import GroundingRecords
from .text import swap_left_right


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
