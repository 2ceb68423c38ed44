"""jxu124's RefCOCO, RefCOCO+ and RefCOCOg (``jxu124/refcoco``, ``refcocoplus``, ``refcocog`` on the
Hugging Face Hub, or a copy saved with ``save_to_disk``) as a source: one row per referred object."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Optional

import numpy as np

from .. import hub
from ..errors import DownloadError, InputError, SourceError
from .base import HUB_IDS, SOURCE_REVISIONS, VARIANTS, Image, PlanItem, Planned, Ref, Source
from .checks import (PIXEL_TOLERANCE, category_name, expressions, image_record, relative_box, sent_ids_problem,
                     xywh_to_xyxy)

# Hugging Face split name -> the name the RefCOCO papers use, in the papers' order. jxu124's
# "test" split of RefCOCO / RefCOCO+ is UNC testA (1,975 refs); RefCOCOg is the UMD partition.
_UNC_SPLITS = {"train": "train", "validation": "val", "test": "testA", "testB": "testB"}
SPLIT_NAMES = {
    "refcoco": _UNC_SPLITS,
    "refcoco+": _UNC_SPLITS,
    "refcocog": {"train": "train", "validation": "val", "test": "test"},
}
# The jxu124 columns the importer reads; the datasets also have file_name (the refer API's
# per-ref name, not an image file), raw_sentences, image_path, captions, global_image_id, anns_id.
REQUIRED_COLUMNS = (
    "sent_ids",
    "ann_id",
    "ref_id",
    "image_id",
    "split",
    "sentences",
    "category_id",
    "raw_anns",
    "raw_image_info",
    "bbox",
)
_PLAN_COLUMNS = ["sent_ids", "image_id", "raw_image_info"]


def _hub_hint(hub_id: str, revision: Optional[str]) -> str:
    return (
        f"on a machine with internet run `datasets.load_dataset({hub_id!r}, revision={revision!r})"
        ".save_to_disk(PATH)`, copy PATH here and pass source=PATH (CLI: --source PATH)"
    )


def load_source(name: str = "refcoco", source=None, revision: Optional[str] = None):
    """The ``datasets.DatasetDict`` of jxu124's ``name``: from the Hub, a ``save_to_disk`` folder, or as given.

    Args:
        name: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        source: None to load ``HUB_IDS[name]`` with ``datasets.load_dataset`` (only from the local
            caches where the Hub cannot be reached: ``hub.hub_offline``); a path to a folder
            written by ``DatasetDict.save_to_disk``; or a ``datasets.DatasetDict``.
        revision: the Hub revision to load (default: ``base.SOURCE_REVISIONS``).
    """
    import datasets

    if name not in VARIANTS:
        raise InputError(f"jxu124's datasets are {list(VARIANTS)}, not {name!r}.")
    hub_id = HUB_IDS[name]
    revision = revision or SOURCE_REVISIONS[hub_id]
    if source is None:
        # where the Hub cannot be used, only the local caches are read: a copy there still loads,
        # a missing one fails at once (load_dataset would retry for half a minute)
        offline = hub.hub_offline()
        try:
            with hub.local_caches_only() if offline else contextlib.nullcontext():
                dsd = datasets.load_dataset(hub_id, revision=revision)
        except OSError as err:  # ConnectionError, offline mode, not in the local cache
            why = f"The Hugging Face Hub cannot be reached ({offline}): could" if offline else "Could"
            raise DownloadError(
                f"{why} not load {hub_id!r} (revision {revision!r}) from the Hugging Face Hub ({err}); "
                f"{_hub_hint(hub_id, revision)}."
            ) from err
    elif isinstance(source, (datasets.DatasetDict, datasets.Dataset)):
        dsd = source
    else:
        try:
            dsd = datasets.load_from_disk(os.fspath(source))
        except FileNotFoundError as err:
            raise SourceError(
                f"source={os.fspath(source)!r} is not a folder written by save_to_disk nor a REFER folder "
                f"(instances.json + refs(...).p) ({err}); {_hub_hint(hub_id, revision)}."
            ) from err
    if not isinstance(dsd, datasets.DatasetDict):
        raise SourceError(
            f"The {name} source is a single split, not a DatasetDict, so its split names are unknown; "
            f"save all splits: `datasets.load_dataset({hub_id!r}).save_to_disk(PATH)`."
        )
    return dsd


class JxuSource(Source):
    """jxu124's datasets: one row per referred object, ``bbox`` pixel xyxy, ``raw_anns`` the COCO
    annotation (pixel xywh) and ``raw_image_info`` the COCO image record, both as JSON."""

    format = "jxu124"

    def __init__(self, name: str, dsd, origin: str, revision: Optional[str] = None):
        self.name, self.dsd, self.origin = name, dsd, origin
        self.hub_id = HUB_IDS[name]
        self.revision = revision or SOURCE_REVISIONS[self.hub_id]
        names = SPLIT_NAMES[name]
        self._unknown = [s for s in dsd if s not in names]
        self.tables = {hf: ours for hf, ours in names.items() if hf in dsd}
        # Both the RefCOCO names (val, testA) and the Hugging Face names (validation, test).
        self.known = {**{ours: ours for ours in names.values()}, **names}

    def _split_hint(self) -> str:
        names = SPLIT_NAMES[self.name]
        return f"{list(names.values())} (or the Hugging Face names {list(names)})"

    def select(self, splits) -> list:
        if splits is None and self._unknown:
            raise SourceError(
                f"The {self.name} source has split(s) {self._unknown} that are not {self.hub_id} splits "
                f"({list(SPLIT_NAMES[self.name])}); pass splits=[...] or the dataset as saved from the Hub."
            )
        selected = super().select(splits)
        for hf in selected:
            missing = [c for c in REQUIRED_COLUMNS if c not in self.dsd[hf].column_names]
            if missing:
                raise SourceError(
                    f"The {self.name} source's split {hf!r} lacks the column(s) {missing}; the importer "
                    f"expects {list(REQUIRED_COLUMNS)}, the columns of {self.hub_id} at revision "
                    f"{self.revision!r}: save that revision unchanged with `datasets.load_dataset("
                    f"{self.hub_id!r}, revision={self.revision!r}).save_to_disk(PATH)`, or pass the "
                    "revision your copy was saved from (revision=..., CLI: --revision)."
                )
        return selected

    def where(self, table: str, index: int) -> str:
        return f"{self.name} split {table!r} row {index}"

    def plan_items(self, table: str) -> Iterator[PlanItem]:
        index = 0
        for batch in self.dsd[table].select_columns(_PLAN_COLUMNS).iter(batch_size=1000):
            for sent_ids, image_id, raw in zip(batch["sent_ids"], batch["image_id"], batch["raw_image_info"]):
                yield PlanItem(index, tuple(int(s) for s in sent_ids or []), int(image_id), raw)
                index += 1

    def image(self, table: str, item: PlanItem, where: str) -> Image:
        return image_record(_json_field(item.raw_image, "raw_image_info", where), item.image_id, where,
                            "raw_image_info")

    def refs(self, table: str, planned: list) -> Iterator[Ref]:
        rows = self.dsd[table].select_columns(list(REQUIRED_COLUMNS)).select([p.index for p in planned])
        for p, row in zip(planned, rows):
            where = f"{self.where(table, p.index)} (ref_id {row['ref_id']})"
            pairs = expressions(row, where)
            problem = sent_ids_problem(row, pairs)
            if problem:
                yield Ref.skipped(where, problem)
                continue
            fields, box = _row_fields(row, p, where)
            yield Ref(fields, [box], pairs)


def _json_field(raw, column: str, where: str):
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as err:
        raise SourceError(f"{where}: {column} is not a JSON string ({err}): {raw!r:.200}") from err


def _annotation(raw_anns, ann_id: int, where: str) -> dict:
    """The COCO annotation of ``ann_id`` in ``raw_anns`` (one annotation, or a list of them)."""
    anns = _json_field(raw_anns, "raw_anns", where)
    if isinstance(anns, list):
        anns = next((a for a in anns if isinstance(a, dict) and a.get("id") == ann_id), None)
    if not isinstance(anns, dict) or "bbox" not in anns:
        raise SourceError(
            f"{where}: raw_anns holds no COCO annotation with a bbox for ann_id {ann_id}: {raw_anns!r:.200}"
        )
    return anns


def _row_fields(row, planned: Planned, where: str) -> tuple:
    """Check one full jxu124 row; returns its per-object sample fields and its relative xyxy box."""
    ref_id, ann_id = int(row["ref_id"]), int(row["ann_id"])
    image = planned.image

    # The row's own split may use either naming; anything else means rows of another split.
    if row["split"] not in (planned.split, planned.table):
        raise SourceError(
            f"{where}: split column says {row['split']!r} but the row is in split {planned.table!r}."
        )
    category = category_name(row["category_id"], where)
    category_id = int(row["category_id"])
    bbox = [float(v) for v in (row["bbox"] or [])]
    box_rel = relative_box(bbox, image, where, f"bbox {bbox}")

    # raw_anns is the COCO annotation itself: its xywh box must be the bbox column's xyxy box,
    # which also catches a source whose bbox is xywh.
    ann = _annotation(row["raw_anns"], ann_id, where)
    ann_xyxy = xywh_to_xyxy(ann["bbox"], where, "raw_anns bbox")
    if not np.allclose(ann_xyxy, bbox, rtol=0.0, atol=PIXEL_TOLERANCE):
        raise SourceError(f"{where}: bbox {bbox} (xyxy) disagrees with raw_anns bbox {ann['bbox']} (xywh).")
    if int(ann.get("category_id", category_id)) != category_id or int(ann.get("id", ann_id)) != ann_id:
        raise SourceError(
            f"{where}: raw_anns (id {ann.get('id')}, category_id {ann.get('category_id')}) disagrees "
            f"with ann_id {ann_id} / category_id {category_id}."
        )
    fields = dict(image_id=image.image_id, ref_id=ref_id, ann_id=ann_id, category=category)
    return fields, box_rel
