"""The RefCOCO-family sources: their names, Hub ids and tested revisions, and the interface every
source gives the import pipeline (``importer.py``).

A *source* is a set of tables, each a sequence of rows, one row per *ref*: a referred object (for
gRefCOCO zero or several objects) with all of its expressions. A table is a Hugging Face split
(``jxu124/*``) or one split of a REFER / gRefCOCO refs file. The import pipeline asks every
source the same things:

- :meth:`Source.select`: which tables hold the splits asked for (and are well formed);
- :meth:`Source.plan_items`: each row's sent_ids and image id, read cheaply, so that an import
  can skip what a dataset already holds before it reads anything else;
- :meth:`Source.image`: the COCO image record of a row that will be imported;
- :meth:`Source.refs`: the planned rows in full, checked, as :class:`Ref` (sample fields, boxes,
  expressions). A row whose expressions cannot be told apart (``checks.sent_ids_problem``: its
  sentences' sent_ids differ from its ``sent_ids`` column, or one repeats) comes back with its
  ``problem`` and nothing else: the import skips and counts it and goes on. Any other fault of a
  row stops the import.

Sources: ``jxu124.JxuSource`` (``jxu124/refcoco``, ``refcocoplus``, ``refcocog`` from the Hub or
saved with ``save_to_disk``), ``refer_source.ReferSource`` (the original REFER files, and
gRefCOCO's) and ``combined.CombinedSource`` (``refcocox``); ``opening.open_source`` picks one from
what the user passes. RefCOCO-M is a FiftyOne dataset, imported apart (``refcoco_m.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

from ..errors import InputError

DEFAULT_CHUNK_SIZE = 1000  # expressions the importer writes per database call

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

# The split names of each source, in the papers' order.
SPLIT_ORDER = {
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),
    GREFCOCO: ("train", "val", "testA", "testB"),
    REFCOCO_M: ("val",),
}


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
