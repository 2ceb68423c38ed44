"""Where RefCOCO-family annotations come from, and how each source's rows become checked refs.

A *source* is a set of tables, each a sequence of rows, one row per *ref*: a referred object (for
gRefCOCO zero or several objects) with all of its expressions. A table is a Hugging Face split
(``jxu124/*``) or one split of a REFER / gRefCOCO refs file. The import pipeline in
``refcoco.py`` asks every source the same things:

- :meth:`Source.select`: which tables hold the splits asked for (and are well formed);
- :meth:`Source.plan_items`: each row's sent_ids and image id, read cheaply, so that an import
  can skip what a dataset already holds before it reads anything else;
- :meth:`Source.image`: the COCO image record of a row that will be imported;
- :meth:`Source.refs`: the planned rows in full, checked, as :class:`Ref` (sample fields, boxes,
  expressions). A row whose expressions cannot be told apart (:func:`sent_ids_problem`: its
  sentences' sent_ids differ from its ``sent_ids`` column, or one repeats) comes back with its
  ``problem`` and nothing else: the import skips and counts it and goes on. Any other fault of a
  row stops the import.

Sources: :class:`JxuSource` (``jxu124/refcoco``, ``refcocoplus``, ``refcocog`` from the Hub or
saved with ``save_to_disk``), :class:`ReferSource` (the original REFER files, and gRefCOCO's) and
:class:`CombinedSource` (``refcocox``: RefCOCO + RefCOCO+ + RefCOCOg, training images that any
val/test split holds removed). :func:`open_source` picks one from what the user passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from .. import hub

from . import refer
from ..models.boxes import box_xywh_to_xyxy, box_xyxy_abs_to_rel, is_valid_xyxy
from ..data.fields import NO_TARGET_FIELD
from ..errors import DownloadError, InputError, SourceError

# The Hugging Face Hub revision each dataset source loads unless told otherwise. The importer's
# column checks and tests follow these; the jxu124 datasets changed their columns between
# revisions, so a copy saved from another revision is refused with the columns it expects.
SOURCE_REVISIONS = {
    "jxu124/refcoco": "main",
    "jxu124/refcocoplus": "main",
    "jxu124/refcocog": "main",
    "FudanCVL/gRefCOCO": "main",
    "Voxel51/RefCOCO-M": "main",
}

VARIANTS = ("refcoco", "refcoco+", "refcocog")  # the three that jxu124 and the REFER release have
GREFCOCO = "grefcoco"
REFCOCO_M = "refcoco-m"
COMBINED = "refcocox"
NAMES = VARIANTS + (GREFCOCO, REFCOCO_M, COMBINED)

HUB_IDS = {
    "refcoco": "jxu124/refcoco",
    "refcoco+": "jxu124/refcocoplus",
    "refcocog": "jxu124/refcocog",
    GREFCOCO: "FudanCVL/gRefCOCO",
    REFCOCO_M: "Voxel51/RefCOCO-M",
}

# Hugging Face split name -> the name the RefCOCO papers use, in the papers' order. jxu124's
# "test" split of RefCOCO / RefCOCO+ is UNC testA (1,975 refs); RefCOCOg is the UMD partition.
_UNC_SPLITS = {"train": "train", "validation": "val", "test": "testA", "testB": "testB"}
SPLIT_NAMES = {
    "refcoco": _UNC_SPLITS,
    "refcoco+": _UNC_SPLITS,
    "refcocog": {"train": "train", "validation": "val", "test": "test"},
}
# The split names of each source, in the papers' order.
SPLIT_ORDER = {
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),
    GREFCOCO: ("train", "val", "testA", "testB"),
    REFCOCO_M: ("val",),
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

# COCO's 80 detection categories (ids 1-90 with gaps), as in instances_train2014.json.
# fmt: off
COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}
# fmt: on

# Pixel slack when checking that a box lies inside its image and agrees with raw_anns: COCO boxes
# are floats that may overshoot the border by rounding, while a format mix-up (xywh read as xyxy,
# width and height swapped) is off by far more.
PIXEL_TOLERANCE = 1.0


@dataclass(frozen=True)
class Image:
    """The COCO image record of a ref."""

    image_id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class PlanItem:
    """A row as the plan reads it: its position, sent_ids, image id and the raw image record."""

    index: int
    sent_ids: tuple
    image_id: int
    raw_image: object = None


@dataclass(frozen=True)
class Planned:
    """A row holding at least one expression that the dataset does not have yet."""

    table: str
    split: str
    index: int
    keys: tuple  # the import keys (see Source.key) of its new expressions
    image: Image


@dataclass
class Ref:
    """A checked row: its sample fields, its boxes (relative xyxy; zero or more) and expressions;
    or, with ``problem`` (where and why), a row to skip, of which nothing else was read."""

    fields: dict
    boxes: list
    expressions: list  # (sent_id, raw text)
    problem: Optional[str] = None

    @classmethod
    def skipped(cls, where: str, problem: str) -> "Ref":
        return cls({}, [], [], f"{where}: {problem}")


def split_order(name: str) -> list:
    """Every split name of ``name``, in the papers' order (refcocox: train, then each source's)."""
    if name == COMBINED:
        return ["train"] + [f"{v}/{s}" for v in VARIANTS for s in SPLIT_ORDER[v] if s != "train"]
    return list(SPLIT_ORDER[name])


def check_name(name: str) -> str:
    if name not in NAMES:
        raise InputError(f"Unknown RefCOCO variant {name!r}; use one of {sorted(NAMES)}.")
    return name


class Source:
    """The interface the import pipeline reads (see the module's docstring)."""

    name: str
    format: str
    origin: str  # what was read: a Hub id, a folder, an object's type
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    key_fields: tuple = ("sent_id",)  # sample fields that identify an expression in a dataset
    tables: dict  # table -> split name, in the papers' order
    known: dict  # every accepted split name -> split name

    def key(self, table: str, sent_id: int):
        """What identifies an expression of ``table`` in the dataset (its ``key_fields``' values)."""
        return int(sent_id)

    def select(self, splits: Union[None, str, Iterable[str]]) -> list:
        """The tables of ``splits`` (all when None), in the papers' order."""
        if splits is None:
            return list(self.tables)
        wanted = set()
        for s in [splits] if isinstance(splits, str) else splits:
            if s not in self.known:
                raise InputError(f"Unknown {self.name} split {s!r}; use one of {self._split_hint()}.")
            wanted.add(self.known[s])
        selected = [t for t, split in self.tables.items() if split in wanted]
        absent = sorted(wanted - {self.tables[t] for t in selected})
        if absent:
            raise InputError(
                f"The {self.name} source has no split(s) {absent}; it has {list(dict.fromkeys(self.tables.values()))}."
            )
        return selected

    def _split_hint(self) -> str:
        return str(list(dict.fromkeys(self.known.values())))

    def where(self, table: str, index: int) -> str:
        raise NotImplementedError

    def plan_items(self, table: str) -> Iterator[PlanItem]:
        raise NotImplementedError

    def image(self, table: str, item: PlanItem, where: str) -> Image:
        raise NotImplementedError

    def refs(self, table: str, planned: list) -> Iterator[Ref]:
        """The ``planned`` rows of ``table``, in full and checked, in their order."""
        raise NotImplementedError

    def info(self) -> dict:
        """What ``dataset.info["refcoco"]`` records about the source."""
        return {"format": self.format, "hub_id": self.hub_id, "revision": self.revision, "source": self.origin}


# ---------------------------------------------------------------- shared checks


def image_record(info, image_id: int, where: str, what: str) -> Image:
    """A COCO image record (``file_name``, ``width``, ``height``, ``id``) checked against ``image_id``."""
    missing = [k for k in ("file_name", "width", "height", "id") if not isinstance(info, dict) or k not in info]
    if missing:
        raise SourceError(f"{where}: {what} lacks {missing}: {info!r:.200}")
    try:
        record_id, width, height = int(info["id"]), int(info["width"]), int(info["height"])
    except (TypeError, ValueError) as err:
        raise SourceError(f"{where}: {what} has a non-integer id, width or height ({err}): {info!r:.200}") from err
    if record_id != int(image_id):
        raise SourceError(f"{where}: {what} id {info['id']} differs from image_id {image_id}.")
    if width <= 0 or height <= 0:
        raise SourceError(f"{where}: {what} has a non-positive size {width}x{height}.")
    # COCO file names are plain names; a path part would let a row point outside images_dir.
    return Image(int(image_id), os.path.basename(str(info["file_name"])), width, height)


def relative_box(xyxy: list, image: Image, where: str, what: str) -> list:
    """A pixel xyxy box checked (positive size, inside its image) and made relative."""
    if not is_valid_xyxy(xyxy):
        raise SourceError(f"{where}: {what} is not a pixel (x_min, y_min, x_max, y_max) box of positive size.")
    x0, y0, x1, y1 = xyxy
    tol = PIXEL_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > image.width + tol or y1 > image.height + tol:
        raise SourceError(f"{where}: {what} lies outside its {image.width}x{image.height} image {image.file_name}.")
    return box_xyxy_abs_to_rel(np.asarray(xyxy, dtype=np.float64), image.width, image.height).tolist()


def xywh_to_xyxy(bbox, where: str, what: str) -> list:
    values = list(bbox) if isinstance(bbox, (list, tuple)) else []
    if len(values) != 4 or not all(isinstance(v, (int, float)) for v in values):
        raise SourceError(f"{where}: {what} {bbox!r:.100} is not a COCO [x, y, width, height] box.")
    return box_xywh_to_xyxy(np.asarray(values, dtype=np.float64)).tolist()


def category_name(category_id, where: str) -> str:
    if int(category_id) not in COCO_CATEGORIES:
        raise SourceError(f"{where}: category_id {category_id} is not one of COCO's 80 categories.")
    return COCO_CATEGORIES[int(category_id)]


def expressions(row, where: str) -> list:
    """(sent_id, raw text) of each expression of a ref (see :func:`sent_ids_problem` for their ids)."""
    pairs = []
    sentences = row["sentences"] or []
    for sentence in sentences:
        if not isinstance(sentence, dict) or "sent_id" not in sentence:
            raise SourceError(
                f"{where}: sentences must be a list of {{raw, sent, sent_id, tokens}} records as in "
                f"the REFER refs; got {sentences!r:.200}"
            )
        # "raw" is the annotator's text; "sent" its lower-cased, cleaned form.
        text = sentence.get("raw") or sentence.get("sent") or ""
        pairs.append((int(sentence["sent_id"]), str(text)))
    return pairs


def sent_ids_problem(row, pairs: list) -> Optional[str]:
    """Why the expressions ``pairs`` of a ref cannot be imported, or None: the sent_ids of its
    sentences differ from its ``sent_ids`` column (another order, other ids: which text is which
    listed expression is not known), or a sent_id repeats in the ref (one would replace the other)."""
    found = [s for s, _ in pairs]
    listed = row.get("sent_ids")
    if listed is not None and found != [int(s) for s in listed]:
        return f"the sent_ids of sentences {found} differ from the sent_ids column {list(listed)}"
    repeated = sorted({s for s in found if found.count(s) > 1})
    if repeated:
        return f"sent_id(s) {repeated} occur more than once in its sentences"
    return None


def _sent_ids(row) -> tuple:
    listed = row.get("sent_ids")
    if listed is None:
        listed = [s.get("sent_id") for s in row.get("sentences") or [] if isinstance(s, dict)]
    return tuple(int(s) for s in listed or [])


# ---------------------------------------------------------------- jxu124


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
        revision: the Hub revision to load (default: ``config.SOURCE_REVISIONS``).
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


# ---------------------------------------------------------------- REFER and gRefCOCO


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
            yield PlanItem(index, _sent_ids(ref), int(ref["image_id"]))

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


# ---------------------------------------------------------------- refcocox


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


# ---------------------------------------------------------------- opening a source


def open_source(name: str, source=None, revision=None) -> Source:
    """The :class:`Source` of ``name`` from what the user passed.

    - ``refcoco`` / ``refcoco+`` / ``refcocog``: None (jxu124 on the Hub), a ``save_to_disk``
      folder or ``DatasetDict``, or a REFER folder (``instances.json`` + ``refs(unc|umd).p``, or
      the release's ``data/`` folder above it), told apart by its contents;
    - ``grefcoco``: None (``FudanCVL/gRefCOCO`` on the Hub) or a folder with ``grefs(unc).json``
      and ``instances.json``;
    - ``refcocox``: None (the three from the Hub), a folder holding one source folder per variant
      (``refcoco/``, ``refcoco+/`` or ``refcocoplus/``, ``refcocog/``: REFER or ``save_to_disk``),
      or a dict ``{variant: source}``; ``revision`` a dict ``{variant: revision}``.
    """
    check_name(name)
    if name == COMBINED:
        return _open_combined(source, revision)
    if name == REFCOCO_M:
        raise InputError(
            "RefCOCO-M is a FiftyOne dataset, not a table source; import it with import_refcoco('refcoco-m')."
        )
    if isinstance(revision, dict):
        raise InputError(f"revision must be a single Hub revision for {name}, e.g. 'main'.")
    if name == GREFCOCO:
        if source is None:
            hub_id = HUB_IDS[GREFCOCO]
            revision = revision or SOURCE_REVISIONS[hub_id]
            return open_refer(name, download_grefcoco(revision), origin=hub_id, hub_id=hub_id, revision=revision)
        return open_refer(name, source)
    if isinstance(source, (str, os.PathLike)) and refer.find_refer_folder(source, name):
        return open_refer(name, source)
    dsd = load_source(name, source, revision)
    origin = HUB_IDS[name] if source is None else (
        os.path.abspath(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    return JxuSource(name, dsd, origin, revision)


def _open_combined(source, revision) -> CombinedSource:
    if revision is not None and not isinstance(revision, dict):
        raise InputError(
            "refcocox combines three Hub datasets: pass revision={'refcoco': ..., 'refcoco+': ..., 'refcocog': ...} "
            "or leave it out for the tested defaults."
        )
    revisions = revision or {}
    if source is None or isinstance(source, dict):
        given = source or {}
        unknown = sorted(set(given) - set(VARIANTS))
        if unknown:
            raise InputError(f"refcocox combines {list(VARIANTS)}; unknown source key(s) {unknown}.")
        sources = {v: given.get(v) for v in VARIANTS}
    else:
        root = os.fspath(source)
        sources = {}
        for variant in VARIANTS:
            names = [variant] + (["refcocoplus"] if variant == "refcoco+" else [])
            found = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
            if found is None:
                raise SourceError(
                    f"{root} has no {' or '.join(names)} folder; refcocox needs one source folder per variant "
                    f"({', '.join(VARIANTS)}): REFER folders (the release's data/) or save_to_disk copies."
                )
            sources[variant] = found
    parts = {v: open_source(v, sources[v], revisions.get(v)) for v in VARIANTS}
    return CombinedSource(parts)
