"""The original REFER release and gRefCOCO as a source: a variant's refs file and ``instances.json``
(read by ``refer.py``), from a folder or, for gRefCOCO, downloaded from the Hub."""

from __future__ import annotations

import os
from typing import Iterator, Optional

from ..data.fields import NO_TARGET_FIELD
from ..errors import DownloadError, SourceError
from . import refer
from .base import GREFCOCO, HUB_IDS, SOURCE_REVISIONS, SPLIT_ORDER, Image, PlanItem, Ref, Source
from .checks import category_name, expressions, image_record, relative_box, row_sent_ids, sent_ids_problem, xywh_to_xyxy


def _as_list(value) -> list:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class ReferSource(Source):
    """The REFER release's refs file and ``instances.json`` of one variant, or gRefCOCO's.

    Each ref's boxes are its COCO annotations' (pixel xywh in ``instances.json``); its image is the
    COCO record of its ``image_id`` there (the ref's own ``file_name`` carries an ``_<n>`` suffix
    and names no file). gRefCOCO refs have zero boxes (``ann_id == [-1]``) or one or more.
    """

    def __init__(self, name: str, found: refer.ReferFolder, refs: list, instances: refer.Instances,
                 origin: Optional[str] = None, hub_id: Optional[str] = None, revision: Optional[str] = None):
        self.name, self.found, self.instances = name, found, instances
        self.format = found.kind
        self.origin = origin or os.path.abspath(found.folder)
        self.hub_id, self.revision = hub_id, revision
        self.multi = found.kind == "grefcoco"
        order = SPLIT_ORDER[name]
        by_split: dict = {}
        for ref in refs:
            by_split.setdefault(str(ref["split"]), []).append(ref)
        unknown = sorted(set(by_split) - set(order))
        if unknown:
            raise SourceError(
                f"{found.refs_path} has split(s) {unknown}, which are not {name}'s {list(order)}; use the "
                f"{found.split_by} refs file of {name} as released."
            )
        self._rows = by_split
        self.tables = {s: s for s in order if s in by_split}
        self.known = {s: s for s in order}

    def where(self, table: str, index: int) -> str:
        return f"{os.path.basename(self.found.refs_path)} split {table!r} ref {index}"

    def plan_items(self, table: str) -> Iterator[PlanItem]:
        for index, ref in enumerate(self._rows[table]):
            yield PlanItem(index, row_sent_ids(ref), int(ref["image_id"]))

    def image(self, table: str, item: PlanItem, where: str) -> Image:
        info = self.instances.images.get(item.image_id)
        if info is None:
            raise SourceError(f"{where}: image_id {item.image_id} is not in {self.instances.path}.")
        return image_record(info, item.image_id, where, "instances.json image")

    def refs(self, table: str, planned: list) -> Iterator[Ref]:
        for p in planned:
            ref = self._rows[table][p.index]
            where = f"{self.where(table, p.index)} (ref_id {ref['ref_id']})"
            yield self._ref(ref, p.image, where)

    def _ref(self, ref: dict, image: Image, where: str) -> Ref:
        pairs = expressions(ref, where)
        problem = sent_ids_problem(ref, pairs)
        if problem:
            return Ref.skipped(where, problem)
        ann_ids = _as_list(ref["ann_id"])
        if ann_ids == [-1]:
            if not self.multi:
                raise SourceError(f"{where}: ann_id -1 (no target) is gRefCOCO's; a {self.name} ref has one object.")
            ann_ids = []
        elif -1 in ann_ids or (not self.multi and len(ann_ids) != 1):
            kind = "a list of objects" if self.multi else "one object"
            raise SourceError(f"{where}: ann_id {ref['ann_id']} is not {kind}.")
        boxes, categories = [], []
        for ann_id in ann_ids:
            ann = self.instances.annotations.get(ann_id)
            if ann is None:
                raise SourceError(f"{where}: ann_id {ann_id} is not in {self.instances.path}.")
            if int(ann.get("image_id", image.image_id)) != image.image_id:
                raise SourceError(f"{where}: ann_id {ann_id} is on image {ann.get('image_id')}, not {image.image_id}.")
            what = f"instances.json bbox {ann.get('bbox')} (xywh) of ann_id {ann_id}"
            boxes.append(relative_box(xywh_to_xyxy(ann.get("bbox"), where, what), image, where, what))
            categories.append(category_name(ann.get("category_id"), where))
        fields = dict(image_id=image.image_id, ref_id=int(ref["ref_id"]))
        if self.multi:
            fields.update(ann_ids=ann_ids, categories=categories, **{NO_TARGET_FIELD: not ann_ids})
        else:
            category_id = _as_list(ref["category_id"])[0]
            if categories != [category_name(category_id, where)]:
                raise SourceError(
                    f"{where}: category_id {category_id} differs from its annotation's ({categories[0]})."
                )
            fields.update(ann_id=ann_ids[0], category=categories[0])
        return Ref(fields, boxes, pairs)


def open_refer(name: str, folder, origin: Optional[str] = None, hub_id: Optional[str] = None,
               revision: Optional[str] = None) -> ReferSource:
    """A :class:`ReferSource` of variant ``name`` from a REFER / gRefCOCO folder (or the folder above it)."""
    folder = os.fspath(folder)
    found_dir = refer.find_refer_folder(folder, name) or folder
    found = refer.open_refer_folder(found_dir, name)
    return ReferSource(name, found, refer.load_refs(found), refer.load_instances(found.instances_path),
                       origin=origin, hub_id=hub_id, revision=revision)


def download_grefcoco(revision: Optional[str] = None) -> str:
    """The folder of gRefCOCO's ``grefs(unc).json`` + ``instances.json``, downloaded from the Hub."""
    import huggingface_hub as hfh

    hub_id = HUB_IDS[GREFCOCO]
    revision = revision or SOURCE_REVISIONS[hub_id]
    try:
        root = hfh.snapshot_download(hub_id, repo_type="dataset", revision=revision,
                                     allow_patterns=["*grefs(*", "*instances.json"])
    except Exception as err:  # offline, unreachable, gated: huggingface_hub raises several kinds
        raise DownloadError(
            f"Could not download {hub_id!r} (revision {revision!r}) from the Hugging Face Hub "
            f"({type(err).__name__}: {err}); download grefs(unc).json and instances.json elsewhere "
            "and pass source=FOLDER (CLI: --source FOLDER)."
        ) from err
    for folder, _, _ in sorted(os.walk(root)):
        if refer.is_refer_folder(folder):
            return folder
    raise SourceError(
        f"{hub_id} at revision {revision!r} has no grefs(unc).json beside instances.json; download "
        "gRefCOCO from its authors and pass source=FOLDER, or pass the revision that has them."
    )
