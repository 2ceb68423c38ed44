"""``refcocox``: RefCOCO + RefCOCO+ + RefCOCOg (UMD) as one source, training images that any of their
val/test splits holds removed from ``train``."""

from __future__ import annotations

import dataclasses
from typing import Iterator

from .base import COMBINED, Image, PlanItem, Ref, Source


class CombinedSource(Source):
    """RefCOCO + RefCOCO+ + RefCOCOg (UMD) as one training set (google-research big_vision's
    ``refcocox_combined``): ``train`` holds the three train splits less every ref whose image is in
    a val or test split of any of them (the three were split independently over overlapping COCO
    images); each evaluation split keeps its source's name (``refcoco/val``, ``refcocog/test``).

    An expression is identified by (``source``, ``sent_id``): each variant numbers its own."""

    name = COMBINED
    format = "combined"
    key_fields = ("source", "sent_id")

    def __init__(self, parts: dict):
        self.parts = parts
        self.origin = {v: p.origin for v, p in parts.items()}
        self.tables = {}
        for variant, part in parts.items():
            # every split of every part, checked: the removal needs all of their images
            for table in part.select(None):
                split = part.tables[table]
                self.tables[f"{variant}:{table}"] = "train" if split == "train" else f"{variant}/{split}"
        self.known = {split: split for split in self.tables.values()}
        self.eval_images = {item.image_id for table, split in self.tables.items() if split != "train"
                            for item in self._part_items(table)}
        images, refs, expressions_ = set(), 0, 0
        for table, split in self.tables.items():
            if split == "train":
                for item in self._part_items(table):
                    if item.image_id in self.eval_images:
                        images.add(item.image_id)
                        refs += 1
                        expressions_ += len(item.sent_ids)
        self.removed = {"images": len(images), "refs": refs, "expressions": expressions_}

    def _split(self, table: str) -> tuple:
        variant, inner = table.split(":", 1)
        return variant, self.parts[variant], inner

    def _part_items(self, table: str) -> Iterator[PlanItem]:
        _, part, inner = self._split(table)
        return part.plan_items(inner)

    def key(self, table: str, sent_id: int):
        return (self._split(table)[0], int(sent_id))

    def where(self, table: str, index: int) -> str:
        _, part, inner = self._split(table)
        return part.where(inner, index)

    def plan_items(self, table: str) -> Iterator[PlanItem]:
        train = self.tables[table] == "train"
        for item in self._part_items(table):
            if not (train and item.image_id in self.eval_images):
                yield item

    def image(self, table: str, item: PlanItem, where: str) -> Image:
        _, part, inner = self._split(table)
        return part.image(inner, item, where)

    def refs(self, table: str, planned: list) -> Iterator[Ref]:
        variant, part, inner = self._split(table)
        own = [dataclasses.replace(p, table=inner, split=part.tables[inner]) for p in planned]
        for ref in part.refs(inner, own):
            ref.fields["source"] = variant
            yield ref

    def info(self) -> dict:
        return {"format": self.format, "hub_id": None, "revision": None, "source": self.origin,
                "parts": {v: p.info() for v, p in self.parts.items()}, "removed": dict(self.removed)}

    def removed_text(self) -> str:
        r = self.removed
        return (f"refcocox: removed {r['images']} training images ({r['expressions']} expressions, {r['refs']} "
                "refs) that also appear in a val or test split of refcoco, refcoco+ or refcocog")
