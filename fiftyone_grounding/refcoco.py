"""Import RefCOCO, RefCOCO+ and RefCOCOg into FiftyOne, one sample per referring expression.

Annotations come from the Hugging Face datasets ``jxu124/refcoco``, ``jxu124/refcocoplus`` and
``jxu124/refcocog`` (or a copy of one written with ``save_to_disk``). Each of their rows is one
referred object with all of its expressions: ``sentences`` (a list of ``{raw, sent, sent_id,
tokens}``), ``sent_ids``, ``bbox`` (pixel xyxy), ``raw_anns`` (the COCO annotation as JSON, bbox in
pixel xywh) and ``raw_image_info`` (the COCO image record as JSON: ``file_name``, ``width``,
``height``, ``id``). Images are not included: all three datasets use COCO train2014 images, read
from a local folder or fetched, only those needed, through FiftyOne's ``coco-2014`` zoo dataset.

The import runs in three steps, so that it fails early and can be resumed:

1. plan: read the few columns that say which expressions are new (``sent_ids``) and which images
   they need (``raw_image_info``), skipping sent_ids already in the FiftyOne dataset;
2. images: make sure every needed image is on disk (zoo fetch, or a local folder), and stop with a
   list of the missing ones before anything is written (unless ``skip_missing=True``);
3. add: parse and check the full rows and add the samples in chunks, so an interrupted import
   keeps every chunk added before it stopped and the next call continues from there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import fiftyone as fo
import fiftyone.core.utils as fou
import torch

from .boxes import box_xywh_to_xyxy, box_xyxy_abs_to_rel, is_valid_xyxy
from .config import DEFAULT_LABEL
from .errors import DownloadError, InputError, MissingImagesError, SourceError
from .labels import declare_expression_attribute, make_detections

logger = logging.getLogger(__name__)

HUB_IDS = {
    "refcoco": "jxu124/refcoco",
    "refcoco+": "jxu124/refcocoplus",
    "refcocog": "jxu124/refcocog",
}

# Hugging Face split name -> the name the RefCOCO papers use, in the papers' order. jxu124's
# "test" split of RefCOCO / RefCOCO+ is UNC testA (1,975 refs); RefCOCOg is the UMD partition.
_UNC_SPLITS = {"train": "train", "validation": "val", "test": "testA", "testB": "testB"}
SPLIT_NAMES = {
    "refcoco": _UNC_SPLITS,
    "refcoco+": _UNC_SPLITS,
    "refcocog": {"train": "train", "validation": "val", "test": "test"},
}

# The columns the importer reads; the jxu124 datasets also have file_name (the refer API's
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

# Every RefCOCO / RefCOCO+ / RefCOCOg image is a COCO train2014 image.
ZOO_DATASET = "coco-2014"
ZOO_SPLIT = "train"

DEFAULT_CHUNK_SIZE = 1000
# Pixel slack when checking that a box lies inside its image and agrees with raw_anns: COCO boxes
# are floats that may overshoot the border by rounding, while a format mix-up (xywh read as xyxy,
# width and height swapped) is off by far more.
_PIXEL_TOLERANCE = 1.0


@dataclass(frozen=True)
class _Image:
    """The COCO image record of a row (from ``raw_image_info``)."""

    image_id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class _PlannedRow:
    """A source row holding at least one expression that the dataset does not have yet."""

    hf_split: str
    split: str
    index: int
    sent_ids: tuple[int, ...]
    image: _Image


@dataclass
class _Plan:
    rows: list[_PlannedRow]
    selected: int  # expressions in the selection (splits, max_samples)
    already_present: int  # of those, expressions whose sent_id the dataset already has

    @property
    def new(self) -> int:
        return sum(len(r.sent_ids) for r in self.rows)


# ---------------------------------------------------------------- source


def _check_name(name: str) -> str:
    if name not in HUB_IDS:
        raise InputError(f"Unknown RefCOCO variant {name!r}; use one of {sorted(HUB_IDS)}.")
    return name


def load_source(name: str = "refcoco", source=None):
    """The ``datasets.DatasetDict`` of ``name``: from the Hub, a ``save_to_disk`` folder, or as given.

    Args:
        name: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        source: None to load ``HUB_IDS[name]`` with ``datasets.load_dataset``; a path to a folder
            written by ``DatasetDict.save_to_disk``; or a ``datasets.DatasetDict``.
    """
    import datasets

    hub_id = HUB_IDS[_check_name(name)]
    save_hint = (
        f"on a machine with internet run `datasets.load_dataset({hub_id!r}).save_to_disk(PATH)`, "
        "copy PATH here and pass source=PATH (CLI: --source PATH)"
    )
    if source is None:
        try:
            dsd = datasets.load_dataset(hub_id)
        except OSError as err:  # ConnectionError, offline mode, not in the local cache
            raise DownloadError(
                f"Could not load {hub_id!r} from the Hugging Face Hub ({err}); {save_hint}."
            ) from err
    elif isinstance(source, (datasets.DatasetDict, datasets.Dataset)):
        dsd = source
    else:
        try:
            dsd = datasets.load_from_disk(os.fspath(source))
        except FileNotFoundError as err:
            raise SourceError(
                f"source={os.fspath(source)!r} is not a folder written by save_to_disk ({err}); {save_hint}."
            ) from err
    if not isinstance(dsd, datasets.DatasetDict):
        raise SourceError(
            f"The {name} source is a single split, not a DatasetDict, so its split names are unknown; "
            f"save all splits: `datasets.load_dataset({hub_id!r}).save_to_disk(PATH)`."
        )
    return dsd


def _select_splits(name: str, dsd, splits: Optional[Iterable[str]]) -> list[tuple[str, str]]:
    """(HF split, RefCOCO split) pairs to import, in the papers' order."""
    names = SPLIT_NAMES[name]
    if splits is None:
        unknown = [s for s in dsd if s not in names]
        if unknown:
            raise SourceError(
                f"The {name} source has split(s) {unknown} that are not {HUB_IDS[name]} splits "
                f"({list(names)}); pass splits=[...] or the dataset as saved from the Hub."
            )
        wanted = {names[s] for s in dsd}
    else:
        # Accept both the RefCOCO names (val, testA) and the Hugging Face names (validation, test).
        wanted = set()
        for s in [splits] if isinstance(splits, str) else splits:
            if s in names.values():
                wanted.add(s)
            elif s in names:
                wanted.add(names[s])
            else:
                raise InputError(
                    f"Unknown {name} split {s!r}; use one of {list(names.values())} "
                    f"(or the Hugging Face names {list(names)})."
                )
    selected = [(hf, ours) for hf, ours in names.items() if ours in wanted and hf in dsd]
    absent = sorted(wanted - {ours for _, ours in selected})
    if absent:
        raise InputError(f"The {name} source has no split(s) {absent}; it has {list(dsd)}.")
    for hf, _ in selected:
        missing = [c for c in REQUIRED_COLUMNS if c not in dsd[hf].column_names]
        if missing:
            raise SourceError(
                f"The {name} source's split {hf!r} lacks the column(s) {missing}; the importer "
                f"needs {list(REQUIRED_COLUMNS)} as in {HUB_IDS[name]}: save that dataset unchanged "
                f"with `datasets.load_dataset({HUB_IDS[name]!r}).save_to_disk(PATH)`."
            )
    return selected


# ---------------------------------------------------------------- plan


def _json_field(raw, column: str, where: str):
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as err:
        raise SourceError(f"{where}: {column} is not a JSON string ({err}): {raw!r:.200}") from err


def _parse_image_info(raw, image_id, where: str) -> _Image:
    info = _json_field(raw, "raw_image_info", where)
    missing = [
        k for k in ("file_name", "width", "height", "id") if not isinstance(info, dict) or k not in info
    ]
    if missing:
        raise SourceError(f"{where}: raw_image_info lacks {missing}: {raw!r:.200}")
    if int(info["id"]) != int(image_id):
        raise SourceError(f"{where}: raw_image_info id {info['id']} differs from image_id {image_id}.")
    width, height = int(info["width"]), int(info["height"])
    if width <= 0 or height <= 0:
        raise SourceError(f"{where}: raw_image_info has a non-positive size {width}x{height}.")
    # COCO file names are plain names; a path part would let a row point outside images_dir.
    file_name = os.path.basename(str(info["file_name"]))
    return _Image(int(image_id), file_name, width, height)


def _plan(name, dsd, selected, existing: set, max_samples: Optional[int]) -> _Plan:
    """Which rows hold new expressions, reading only the sent_ids and image columns."""
    rows, seen, n_selected, n_present = [], set(), 0, 0
    for hf_split, split in selected:
        index = 0
        for batch in dsd[hf_split].select_columns(_PLAN_COLUMNS).iter(batch_size=1000):
            for sent_ids, image_id, raw_info in zip(
                batch["sent_ids"], batch["image_id"], batch["raw_image_info"]
            ):
                where = f"{name} split {hf_split!r} row {index}"
                ids = [int(s) for s in sent_ids or []]
                if max_samples is not None:
                    ids = ids[: max_samples - n_selected]
                # sent_id is the import's key; a repeat would silently drop an expression.
                repeated = [s for s in ids if s in seen]
                if repeated or len(set(ids)) != len(ids):
                    raise SourceError(
                        f"{where}: sent_id(s) {repeated or ids} occur more than once in the source."
                    )
                seen.update(ids)
                n_selected += len(ids)
                new = tuple(s for s in ids if s not in existing)
                n_present += len(ids) - len(new)
                if new:
                    image = _parse_image_info(raw_info, image_id, where)
                    rows.append(_PlannedRow(hf_split, split, index, new, image))
                index += 1
                if max_samples is not None and n_selected >= max_samples:
                    return _Plan(rows, n_selected, n_present)
    return _Plan(rows, n_selected, n_present)


def coco_zoo_request(image_ids: Iterable[int]) -> dict:
    """The FiftyOne zoo request that fetches exactly ``image_ids`` of COCO train2014.

    ``foz.download_zoo_dataset(**request)`` (and ``load_zoo_dataset``) downloads COCO's
    train2014 annotation file once, then only the listed images, into
    ``<fo.config.dataset_zoo_dir>/coco-2014/train/data/<file_name>``.
    """
    return {"name": ZOO_DATASET, "split": ZOO_SPLIT, "image_ids": sorted({int(i) for i in image_ids})}


def _existing(dataset_name: str, name: str) -> tuple[Optional[fo.Dataset], set]:
    """The dataset (if it exists) and the sent_ids it holds; refuses another variant's dataset."""
    if not fo.dataset_exists(dataset_name):
        return None, set()
    dataset = fo.load_dataset(dataset_name)
    recorded = dataset.info.get("refcoco", {}).get("name")
    if recorded is not None and recorded != name:
        # sent_ids of the three variants overlap, so mixing them would drop expressions as "present".
        raise InputError(
            f"Dataset {dataset_name!r} holds {recorded}, not {name}; import {name} into another "
            f"dataset (dataset_name=...)."
        )
    if "sent_id" not in dataset.get_field_schema():
        return dataset, set()
    return dataset, set(dataset.distinct("sent_id"))


def plan_zoo_request(
    name: str = "refcoco",
    splits: Optional[Sequence[str]] = None,
    dataset_name: Optional[str] = None,
    max_samples: Optional[int] = None,
    source=None,
) -> dict:
    """The zoo request ``import_refcoco`` (same arguments, no ``images_dir``) would make.

    It names only the images of expressions that ``dataset_name`` does not hold yet, so it can be
    used to pre-fetch images, or to see what an import would download.
    """
    name = _check_name(name)
    dsd = load_source(name, source)
    selected = _select_splits(name, dsd, splits)
    _, existing = _existing(dataset_name or name, name)
    plan = _plan(name, dsd, selected, existing, max_samples)
    return coco_zoo_request(r.image.image_id for r in plan.rows)


# ---------------------------------------------------------------- images


def _fetch_from_zoo(plan: _Plan, zoo_kwargs: Optional[dict]) -> str:
    """Fetch the planned rows' images through FiftyOne's zoo; returns the folder they are in."""
    import fiftyone.zoo as foz

    request = coco_zoo_request(r.image.image_id for r in plan.rows)
    try:
        # download_zoo_dataset (which load_zoo_dataset calls first) fetches the files without
        # also building a throwaway "coco-2014-train" FiftyOne dataset of all COCO detections.
        _, zoo_dir = foz.download_zoo_dataset(
            request["name"], split=request["split"], image_ids=request["image_ids"], **(zoo_kwargs or {})
        )
    except Exception as err:  # network errors come from several libraries (requests, urllib, eta)
        raise DownloadError(
            f"Could not fetch {len(request['image_ids'])} COCO train2014 images through FiftyOne's "
            f"zoo ({type(err).__name__}: {err}); pass images_dir=<folder of COCO train2014 images> "
            "(CLI: --images-dir), or run where cocodataset.org is reachable."
        ) from err
    return os.path.join(zoo_dir, request["split"], "data")


def _missing_images(plan: _Plan, images_dir: str) -> list[str]:
    names = {r.image.file_name for r in plan.rows}
    return sorted(n for n in names if not os.path.isfile(os.path.join(images_dir, n)))


def _write_report(path: str, missing: list[str]) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(n + "\n" for n in missing))
    return path


# ---------------------------------------------------------------- rows -> samples


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


def _expressions(row, where: str) -> list[tuple[int, str]]:
    """(sent_id, raw text) of each expression, checked against the ``sent_ids`` column."""
    pairs = []
    sentences = row["sentences"] or []
    for sentence in sentences:
        if not isinstance(sentence, dict) or "sent_id" not in sentence:
            raise SourceError(
                f"{where}: sentences must be a list of {{raw, sent, sent_id, tokens}} records as in "
                f"jxu124's datasets; got {sentences!r:.200}"
            )
        # "raw" is the annotator's text; "sent" its lower-cased, cleaned form.
        text = sentence.get("raw") or sentence.get("sent") or ""
        pairs.append((int(sentence["sent_id"]), str(text)))
    found = [s for s, _ in pairs]
    if found != [int(s) for s in row["sent_ids"]]:
        raise SourceError(
            f"{where}: the sent_ids of sentences {found} differ from the sent_ids column {row['sent_ids']}."
        )
    return pairs


def _row_fields(row, planned: _PlannedRow, where: str) -> tuple[dict, list[float]]:
    """Check one full row; returns its per-object sample fields and its relative xyxy box."""
    ref_id, ann_id = int(row["ref_id"]), int(row["ann_id"])
    image = planned.image

    # The row's own split may use either naming; anything else means rows of another split.
    if row["split"] not in (planned.split, planned.hf_split):
        raise SourceError(
            f"{where}: split column says {row['split']!r} but the row is in split {planned.hf_split!r}."
        )

    category_id = int(row["category_id"])
    if category_id not in COCO_CATEGORIES:
        raise SourceError(f"{where}: category_id {category_id} is not one of COCO's 80 categories.")

    bbox = [float(v) for v in (row["bbox"] or [])]
    if not is_valid_xyxy(bbox):
        raise SourceError(
            f"{where}: bbox {bbox} is not a pixel (x_min, y_min, x_max, y_max) box of positive size."
        )
    x0, y0, x1, y1 = bbox
    tol = _PIXEL_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > image.width + tol or y1 > image.height + tol:
        raise SourceError(
            f"{where}: bbox {bbox} lies outside its {image.width}x{image.height} image {image.file_name}."
        )

    # raw_anns is the COCO annotation itself: its xywh box must be the bbox column's xyxy box,
    # which also catches a source whose bbox is xywh.
    ann = _annotation(row["raw_anns"], ann_id, where)
    ann_xyxy = box_xywh_to_xyxy(torch.tensor([float(v) for v in ann["bbox"]], dtype=torch.float64))
    if not torch.allclose(ann_xyxy, torch.tensor(bbox, dtype=torch.float64), rtol=0.0, atol=tol):
        raise SourceError(f"{where}: bbox {bbox} (xyxy) disagrees with raw_anns bbox {ann['bbox']} (xywh).")
    if int(ann.get("category_id", category_id)) != category_id or int(ann.get("id", ann_id)) != ann_id:
        raise SourceError(
            f"{where}: raw_anns (id {ann.get('id')}, category_id {ann.get('category_id')}) disagrees "
            f"with ann_id {ann_id} / category_id {category_id}."
        )

    box_rel = box_xyxy_abs_to_rel(torch.tensor(bbox, dtype=torch.float64), image.width, image.height)
    fields = dict(
        split=planned.split,
        image_id=image.image_id,
        ref_id=ref_id,
        ann_id=ann_id,
        category=COCO_CATEGORIES[category_id],
    )
    return fields, box_rel.tolist()


def _samples(name, dsd, rows: list[_PlannedRow], images_dir: str, stats: dict, label: str):
    """Yield one ``fo.Sample`` per planned expression, reading the planned rows in full."""
    for hf_split in dict.fromkeys(r.hf_split for r in rows):
        group = [r for r in rows if r.hf_split == hf_split]
        table = dsd[hf_split].select_columns(list(REQUIRED_COLUMNS)).select([r.index for r in group])
        for planned, row in zip(group, table):
            where = f"{name} split {hf_split!r} row {planned.index} (ref_id {row['ref_id']})"
            fields, box_rel = _row_fields(row, planned, where)
            filepath = os.path.join(images_dir, planned.image.file_name)
            wanted = set(planned.sent_ids)
            for sent_id, text in _expressions(row, where):
                if sent_id not in wanted:
                    continue
                if not text.strip():
                    # Nothing to ground; the rest of the source should still import.
                    stats["empty_expressions"].append(sent_id)
                    continue
                yield fo.Sample(
                    filepath=filepath,
                    tags=[planned.split],
                    metadata=fo.ImageMetadata(width=planned.image.width, height=planned.image.height),
                    expression=text,
                    ground_truth=make_detections(box_rel, text, label=label),
                    sent_id=sent_id,
                    **fields,
                )


# ---------------------------------------------------------------- import


def import_refcoco(
    name: str = "refcoco",
    splits: Optional[Sequence[str]] = None,
    images_dir: Optional[str] = None,
    dataset_name: Optional[str] = None,
    max_samples: Optional[int] = None,
    skip_missing: bool = False,
    source=None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    missing_report: Optional[str] = None,
    zoo_kwargs: Optional[dict] = None,
    progress: Union[None, bool, Callable] = None,
    label: str = DEFAULT_LABEL,
) -> fo.Dataset:
    """Import RefCOCO / RefCOCO+ / RefCOCOg into a persistent FiftyOne dataset, one sample per expression.

    Each sample has ``filepath`` (the COCO train2014 image), ``expression`` (the raw text),
    ``ground_truth`` (``fo.Detections`` with one box labelled ``label``, the text as its
    ``expression`` attribute), ``split`` (also
    a tag: train / val / testA / testB, or train / val / test for RefCOCOg), ``image_id``,
    ``ref_id``, ``ann_id``, ``sent_id``, ``category`` and ``metadata`` (width, height, taken from
    the annotations without opening the image). ``dataset.info["refcoco"]`` records the variant,
    its Hub id, the source, the splits present and a summary of the last import.

    Importing again is safe: expressions whose ``sent_id`` the dataset holds are skipped, so a
    repeated call adds nothing and an interrupted one continues where it stopped.

    Args:
        name: ``"refcoco"``, ``"refcoco+"`` or ``"refcocog"``.
        splits: splits to import (RefCOCO names such as ``"val"``, ``"testA"``, or the Hugging
            Face names such as ``"validation"``, ``"test"``); None for all.
        images_dir: a folder holding COCO train2014 images (``COCO_train2014_<id:012d>.jpg``).
            None fetches just the needed images through FiftyOne's ``coco-2014`` zoo dataset.
        dataset_name: the FiftyOne dataset to create or extend; defaults to ``name``.
        max_samples: import only the first ``max_samples`` expressions of the selected splits.
        skip_missing: skip expressions whose image is missing (and report them) instead of
            stopping with the list of missing images.
        source: a folder written by ``datasets.load_dataset(HUB_ID).save_to_disk(PATH)`` or a
            ``DatasetDict``; None loads ``HUB_IDS[name]`` from the Hugging Face Hub.
        chunk_size: expressions added per database write; an interruption loses at most one chunk.
        missing_report: where to write the list of missing image files; defaults to
            ``<fo.config.default_dataset_dir>/<dataset_name>-missing-images.txt``.
        zoo_kwargs: extra arguments for ``foz.download_zoo_dataset`` (for example ``num_workers``).
        progress: show a progress bar (True/False; None follows ``fo.config.show_progress_bars``)
            or a callable that receives the ``ProgressBar`` at each update.
        label: the label of every ground-truth box (``labels.DEFAULT_LABEL``, "referent").

    Returns:
        the ``fo.Dataset``.
    """
    name = _check_name(name)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}.")
    dsd = load_source(name, source)
    selected = _select_splits(name, dsd, splits)
    dataset_name = dataset_name or name
    dataset, existing = _existing(dataset_name, name)
    plan = _plan(name, dsd, selected, existing, max_samples)

    report_path, missing, n_skipped_missing = None, [], 0
    if plan.rows:
        if images_dir is None:
            images_dir = _fetch_from_zoo(plan, zoo_kwargs)
        images_dir = os.path.abspath(os.path.expanduser(images_dir))
        missing = _missing_images(plan, images_dir)
    if missing:
        report_path = _write_report(
            missing_report
            or os.path.join(fo.config.default_dataset_dir, f"{dataset_name}-missing-images.txt"),
            missing,
        )
        lost = set(missing)
        n_skipped_missing = sum(len(r.sent_ids) for r in plan.rows if r.image.file_name in lost)
        summary = (
            f"{len(missing)} of the {len({r.image.file_name for r in plan.rows})} images needed are "
            f"missing from {images_dir} ({n_skipped_missing} expressions), e.g. {missing[:5]}; "
            f"full list in {report_path}"
        )
        if not skip_missing:
            raise MissingImagesError(
                f"{summary}. Put them there (COCO train2014 files), or pass skip_missing=True "
                "(CLI: --skip-missing) to import without them."
            )
        logger.warning("Skipping them: %s", summary)
        plan.rows = [r for r in plan.rows if r.image.file_name not in lost]

    if dataset is None:
        dataset = fo.Dataset(dataset_name)
        dataset.persistent = True
    # Recorded before adding, so that a resumed import finds which variant the dataset holds.
    record = dict(dataset.info.get("refcoco", {}))
    record.update(name=name, hub_id=HUB_IDS[name], source=_describe(source, name))
    dataset.info["refcoco"] = record
    dataset.save()

    stats = {"empty_expressions": []}
    added = _add_in_chunks(
        dataset, _samples(name, dsd, plan.rows, images_dir, stats, label), plan.new, chunk_size, progress
    )
    if added:
        declare_expression_attribute(dataset, "ground_truth")
    if stats["empty_expressions"]:
        logger.warning(
            "Skipped %d expressions with no text, sent_ids %s",
            len(stats["empty_expressions"]),
            stats["empty_expressions"][:20],
        )

    present = set(dataset.distinct("split")) if "split" in dataset.get_field_schema() else set()
    record["splits"] = [s for s in dict.fromkeys(SPLIT_NAMES[name].values()) if s in present]
    record["last_import"] = dict(
        selected=plan.selected,
        added=added,
        already_present=plan.already_present,
        missing_images=len(missing),
        skipped_missing_image=n_skipped_missing,
        skipped_empty=len(stats["empty_expressions"]),
        missing_report=report_path,
    )
    dataset.info["refcoco"] = record
    dataset.save()
    logger.info("%s: added %d expressions (%d already present)", dataset_name, added, plan.already_present)
    return dataset


def _describe(source, name: str) -> str:
    if source is None:
        return HUB_IDS[name]
    if isinstance(source, (str, os.PathLike)):
        return os.path.abspath(os.fspath(source))
    return type(source).__name__


def _add_in_chunks(dataset: fo.Dataset, samples, total: int, chunk_size: int, progress) -> int:
    """Add ``samples`` ``chunk_size`` at a time, so a failure keeps every earlier chunk."""
    added, chunk = 0, []
    with fou.ProgressBar(total=total, progress=progress, iters_str="expressions") as pb:
        for sample in samples:
            chunk.append(sample)
            if len(chunk) >= chunk_size:
                dataset.add_samples(chunk, progress=False)
                added += len(chunk)
                pb.update(len(chunk))
                chunk = []
        if chunk:
            dataset.add_samples(chunk, progress=False)
            added += len(chunk)
            pb.update(len(chunk))
    return added


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    """Add the ``import-refcoco`` arguments to an ``argparse`` parser."""
    parser.description = (
        "Import RefCOCO, RefCOCO+ or RefCOCOg (Hugging Face jxu124/refcoco, refcocoplus, refcocog) "
        "into a persistent FiftyOne dataset, one sample per referring expression. Running it again "
        "adds only what is missing, so an interrupted import can simply be restarted."
    )
    parser.add_argument(
        "name",
        nargs="?",
        default="refcoco",
        choices=sorted(HUB_IDS),
        help="which dataset to import (default: %(default)s)",
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        metavar="SPLIT",
        help="splits to import: train val testA testB (refcoco, refcoco+) or train val test "
        "(refcocog); Hugging Face names (validation, test) also work. Default: all",
    )
    parser.add_argument(
        "--source",
        metavar="PATH",
        help="a local copy of the annotations, made on a machine with internet with "
        "datasets.load_dataset('jxu124/refcoco').save_to_disk(PATH) (refcocoplus for refcoco+, "
        "refcocog for refcocog). Default: load from the Hugging Face Hub",
    )
    parser.add_argument(
        "--images-dir",
        metavar="DIR",
        help="folder of COCO train2014 images (COCO_train2014_<id>.jpg). Default: fetch only the "
        "needed images through FiftyOne's coco-2014 zoo dataset",
    )
    parser.add_argument(
        "--dataset-name",
        metavar="NAME",
        help="FiftyOne dataset to create or extend (default: the name argument, e.g. refcoco)",
    )
    parser.add_argument(
        "--max-samples", type=int, metavar="N", help="import only the first N expressions, for a quick look"
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip expressions whose image is missing (listed in the report) instead of stopping",
    )
    parser.add_argument(
        "--missing-report", metavar="FILE", help="where to write the list of missing image files"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="expressions written per database call; an interruption loses at most one chunk "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--num-workers", type=int, metavar="N", help="download threads for the zoo fetch of images"
    )


def run_from_args(args) -> int:
    """Run ``import_refcoco`` from parsed ``add_arguments`` arguments; prints a summary, returns 0."""
    dataset = import_refcoco(
        name=args.name,
        splits=args.splits,
        images_dir=args.images_dir,
        dataset_name=args.dataset_name,
        max_samples=args.max_samples,
        skip_missing=args.skip_missing,
        source=args.source,
        chunk_size=args.chunk_size,
        missing_report=args.missing_report,
        zoo_kwargs={"num_workers": args.num_workers} if args.num_workers else None,
    )
    record = dataset.info["refcoco"]
    last = record["last_import"]
    counts = dataset.count_values("split")
    per_split = ", ".join(f"{s} {counts[s]}" for s in record["splits"])
    print(f"Dataset {dataset.name!r}: {len(dataset)} expressions ({per_split})")
    print(f"This run added {last['added']}; {last['already_present']} were already present.")
    if last["missing_images"]:
        print(
            f"Skipped {last['skipped_missing_image']} expressions of {last['missing_images']} missing "
            f"images; list in {last['missing_report']}"
        )
    return 0
