"""Import RefCOCO-family datasets into FiftyOne, one sample per referring expression.

Sources (``import_refcoco(name, source=...)``; what each file holds: ``jxu124.py``, ``refer.py``,
``refer_source.py``, ``combined.py``; their names and revisions: ``base.py``):

- ``refcoco``, ``refcoco+``, ``refcocog``: the Hugging Face datasets ``jxu124/refcoco``,
  ``jxu124/refcocoplus``, ``jxu124/refcocog`` (or a copy written with ``save_to_disk``), or the
  original REFER release (``instances.json`` + ``refs(unc).p`` / ``refs(umd).p``), told apart by
  the folder's contents. The two give the same samples for the same refs.
- ``grefcoco``: gRefCOCO (``grefs(unc).json`` + ``instances.json``, or ``FudanCVL/gRefCOCO``):
  expressions that refer to zero, one or several objects; ``no_target`` marks the first kind.
- ``refcoco-m``: ``Voxel51/RefCOCO-M``, a cleaned RefCOCO val with pixel-accurate masks, loaded
  with FiftyOne's ``load_from_hub`` (``refcoco_m.py``).
- ``refcocox``: RefCOCO + RefCOCO+ + RefCOCOg (UMD) as one clean training set: every training
  image that any of their val/test splits holds is removed from ``train``; the evaluation splits
  keep their source's name (``refcoco/val``, ``refcocog/test``).

Images are not included (except RefCOCO-M's): all use COCO train2014 images, read from a local
folder or fetched, only those needed, through FiftyOne's ``coco-2014`` zoo dataset.

The import runs in three steps, so that it fails early and can be resumed:

1. plan: read the few columns that say which expressions are new (``sent_ids``) and which images
   they need, skipping expressions already in the FiftyOne dataset;
2. images: make sure every needed image is on disk (zoo fetch, or a local folder), and stop with a
   list of the missing ones before anything is written (unless ``skip_missing=True``);
3. add: parse and check the full rows and add the samples in chunks, so an interrupted import
   keeps every chunk added before it stopped and the next call continues from there.

A row whose expressions cannot be told apart (its sentences' sent_ids differ from its
``sent_ids``, or a sent_id repeats in it or repeats an earlier row's) is skipped and counted in
the import's summary (``skipped_bad_refs``), and the import goes on; any other fault of a row
stops it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import fiftyone as fo
import fiftyone.core.utils as fou

from ..data.fields import DEFAULT_LABEL, NO_TARGET_FIELD
from ..data.labels import declare_expression_attribute, make_box_detections
from ..errors import DownloadError, InputError, MissingImagesError
from ..progress import fiftyone_progress
from . import ref_l4 as ref_l4_reviews, refcoco_m
from .base import COMBINED, DEFAULT_CHUNK_SIZE, REFCOCO_M, SOURCE_REVISIONS, Planned, Source, check_name, split_order
from .opening import open_source

logger = logging.getLogger(__name__)

# Every RefCOCO-family image is a COCO train2014 image.
ZOO_DATASET = "coco-2014"
ZOO_SPLIT = "train"



@dataclass
class _Plan:
    rows: list  # of base.Planned
    selected: int  # expressions in the selection (splits, max_samples)
    already_present: int  # of those, expressions the dataset already has
    bad_refs: list  # (where and why, expressions) of the rows skipped for repeated sent_ids

    @property
    def new(self) -> int:
        return sum(len(r.keys) for r in self.rows)


# ---------------------------------------------------------------- plan


def _plan(source: Source, tables: list, existing: set, max_samples: Optional[int]) -> _Plan:
    """Which rows hold new expressions, reading only what says so (sent_ids, image ids). A row
    whose sent_ids repeat (in the row, or an earlier row's) is skipped and counted: the sent_id
    is the import's identity of an expression, so a repeat would silently drop one."""
    rows, seen, bad, n_selected, n_present = [], set(), [], 0, 0
    for table in tables:
        split = source.tables[table]
        for item in source.plan_items(table):
            where = source.where(table, item.index)
            keys = [source.key(table, s) for s in item.sent_ids]
            repeated = sorted({k for k in keys if k in seen or keys.count(k) > 1}, key=str)
            seen.update(keys)
            if repeated:
                bad.append((f"{where}: sent_id(s) {repeated} occur more than once in the source", len(keys)))
                continue
            if max_samples is not None:
                keys = keys[: max_samples - n_selected]
            n_selected += len(keys)
            new = tuple(k for k in keys if k not in existing)
            n_present += len(keys) - len(new)
            if new:
                rows.append(Planned(table, split, item.index, new, source.image(table, item, where)))
            if max_samples is not None and n_selected >= max_samples:
                return _Plan(rows, n_selected, n_present, bad)
    return _Plan(rows, n_selected, n_present, bad)


def coco_zoo_request(image_ids: Iterable[int]) -> dict:
    """The FiftyOne zoo request that fetches exactly ``image_ids`` of COCO train2014.

    ``foz.download_zoo_dataset(**request)`` (and ``load_zoo_dataset``) downloads COCO's
    train2014 annotation file once, then only the listed images, into
    ``<fo.config.dataset_zoo_dir>/coco-2014/train/data/<file_name>``.
    """
    return {"name": ZOO_DATASET, "split": ZOO_SPLIT, "image_ids": sorted({int(i) for i in image_ids})}


def _existing(dataset_name: str, name: str, key_fields: Sequence[str] = ("sent_id",)) -> tuple:
    """The dataset (if it exists) and the keys of the expressions it holds; refuses another
    variant's dataset."""
    if not fo.dataset_exists(dataset_name):
        return None, set()
    dataset = fo.load_dataset(dataset_name)
    recorded = dataset.info.get("refcoco", {}).get("name")
    if recorded is not None and recorded != name:
        # sent_ids of the variants overlap, so mixing them would drop expressions as "present".
        raise InputError(
            f"Dataset {dataset_name!r} holds {recorded}, not {name}; import {name} into another "
            f"dataset (dataset_name=...)."
        )
    schema = dataset.get_field_schema()
    if any(f not in schema for f in key_fields):
        return dataset, set()
    if len(key_fields) == 1:
        return dataset, set(dataset.distinct(key_fields[0]))
    return dataset, set(zip(*dataset.values(list(key_fields))))


def plan_zoo_request(
    name: str = "refcoco",
    splits: Optional[Sequence[str]] = None,
    dataset_name: Optional[str] = None,
    max_samples: Optional[int] = None,
    source=None,
    revision=None,
) -> dict:
    """The zoo request ``import_refcoco`` (same arguments, no ``images_dir``) would make.

    It names only the images of expressions that ``dataset_name`` does not hold yet, so it can be
    used to pre-fetch images, or to see what an import would download.
    """
    if check_name(name) == REFCOCO_M:
        raise InputError("RefCOCO-M ships its own images; there is nothing to fetch from COCO.")
    src = open_source(name, source, revision)
    tables = src.select(splits)
    _, existing = _existing(dataset_name or name, name, src.key_fields)
    plan = _plan(src, tables, existing, max_samples)
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


def _write_report(path: str, missing: list) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(n + "\n" for n in missing))
    return path


@dataclass
class _Missing:
    files: list  # missing image files (names, or paths where the source names its own)
    report: Optional[str] = None
    expressions: int = 0  # expressions skipped for them


def _missing_images(needed: dict, where: str, dataset_name: str, missing_report: Optional[str],
                    skip_missing: bool) -> _Missing:
    """Stop (or, with ``skip_missing``, report) when images are not on disk.

    ``needed``: image file -> (path to check, expressions that need it)."""
    missing = sorted(n for n, (path, _) in needed.items() if not os.path.isfile(path))
    if not missing:
        return _Missing([])
    report = _write_report(
        missing_report or os.path.join(fo.config.default_dataset_dir, f"{dataset_name}-missing-images.txt"), missing
    )
    lost = sum(needed[n][1] for n in missing)
    summary = (
        f"{len(missing)} of the {len(needed)} images needed are missing from {where} ({lost} expressions), "
        f"e.g. {missing[:5]}; full list in {report}"
    )
    if not skip_missing:
        raise MissingImagesError(
            f"{summary}. Put them there (COCO train2014 files), or pass skip_missing=True "
            "(CLI: --skip-missing) to import without them."
        )
    logger.warning("Skipping them: %s", summary)
    return _Missing(missing, report, lost)


# ---------------------------------------------------------------- rows -> samples


def _samples(source: Source, rows: list, images_dir: str, stats: dict, label: str):
    """Yield one ``fo.Sample`` per planned expression, reading the planned rows in full; a row
    the source says to skip (``Ref.problem``) goes to ``stats["bad_refs"]``."""
    for table in dict.fromkeys(r.table for r in rows):
        group = [r for r in rows if r.table == table]
        for planned, ref in zip(group, source.refs(table, group)):
            if ref.problem:
                stats["bad_refs"].append((ref.problem, len(planned.keys)))
                continue
            filepath = os.path.join(images_dir, planned.image.file_name)
            wanted = set(planned.keys)
            for sent_id, text in ref.expressions:
                if source.key(table, sent_id) not in wanted:
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
                    ground_truth=make_box_detections(ref.boxes, text, label=label),
                    split=planned.split,
                    sent_id=sent_id,
                    **ref.fields,
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
    revision=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    missing_report: Optional[str] = None,
    zoo_kwargs: Optional[dict] = None,
    progress: Union[None, bool, Callable] = None,
    label: str = DEFAULT_LABEL,
    ref_l4=None,
) -> fo.Dataset:
    """Import a RefCOCO-family dataset into a persistent FiftyOne dataset, one sample per expression.

    Each sample has ``filepath`` (the COCO train2014 image), ``expression`` (the raw text),
    ``ground_truth`` (``fo.Detections`` with the referred box labelled ``label``, the text as its
    ``expression`` attribute), ``split`` (also a tag: train / val / testA / testB, train / val /
    test for RefCOCOg, ``refcoco/val`` ... for refcocox), ``image_id``, ``ref_id``, ``sent_id``
    and ``metadata`` (width, height, taken from the annotations without opening the image), plus:

    - ``refcoco``, ``refcoco+``, ``refcocog``: ``ann_id`` and ``category``;
    - ``grefcoco``: ``ground_truth`` holds zero, one or several boxes; ``ann_ids``,
      ``categories`` (one per box) and ``no_target`` (True: the expression refers to nothing).
      One-box training and evaluation skip (and count) no-target and several-target samples;
    - ``refcoco-m``: the box carries its pixel-accurate ``mask``; ``category``,
      ``supercategory``, ``refcoco_m_id`` (the Hub's detection id), no ``sent_id``; split val;
    - ``refcocox``: ``source`` (the variant), ``ann_id``, ``category``.

    ``dataset.info["refcoco"]`` records the name, the source (format, Hub id and revision, or
    folder), the splits present, a summary of the last import and, for refcocox, the training
    images and expressions removed (also printed).

    Importing again is safe: expressions the dataset holds are skipped, so a repeated call adds
    nothing and an interrupted one continues where it stopped.

    Args:
        name: ``"refcoco"``, ``"refcoco+"``, ``"refcocog"``, ``"grefcoco"``, ``"refcoco-m"`` or
            ``"refcocox"``.
        splits: splits to import (``"val"``, ``"testA"``; for jxu124 also the Hugging Face names
            ``"validation"``, ``"test"``; for refcocox ``"train"``, ``"refcoco/val"``, ...); None for all.
        images_dir: a folder holding COCO train2014 images (``COCO_train2014_<id:012d>.jpg``).
            None fetches just the needed images through FiftyOne's ``coco-2014`` zoo dataset.
            RefCOCO-M ships its images: leave it out.
        dataset_name: the FiftyOne dataset to create or extend; defaults to ``name``.
        max_samples: import only the first ``max_samples`` expressions of the selected splits.
        skip_missing: skip expressions whose image is missing (and report them) instead of
            stopping with the list of missing images.
        source: where the annotations are (see ``sources.opening.open_source``): None for the Hugging
            Face Hub; a ``save_to_disk`` folder or ``DatasetDict`` (jxu124); a REFER or gRefCOCO
            folder; a local copy of RefCOCO-M; for refcocox a folder of per-variant folders or a
            dict ``{variant: source}``.
        revision: the Hub revision to load (default: ``sources.base.SOURCE_REVISIONS``); for refcocox a
            dict ``{variant: revision}``.
        chunk_size: expressions added per database write; an interruption loses at most one chunk.
        missing_report: where to write the list of missing image files; defaults to
            ``<fo.config.default_dataset_dir>/<dataset_name>-missing-images.txt``.
        zoo_kwargs: extra arguments for ``foz.download_zoo_dataset`` (for example ``num_workers``).
        progress: show a progress bar (True/False; None follows ``fo.config.show_progress_bars``)
            or a callable that receives the ``ProgressBar`` at each update.
        label: the label of every ground-truth box (``data.fields.DEFAULT_LABEL``, "referent").
        ref_l4: join Ref-L4's human review of the val/test expressions after the import
            (``ref_l4.join_ref_l4``: fields ``ref_l4_caption_quality``, ``ref_l4_wrong``; CC BY-NC
            4.0, evaluation only): a folder of its ``*_reviewed.json`` files, or True to download
            them from the Hub (read before the import, so a failure comes first). refcoco, refcoco+,
            refcocog and refcocox only.

    Returns:
        the ``fo.Dataset``.
    """
    name = check_name(name)
    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}.")
    reviews = None
    if ref_l4 is not None and ref_l4 is not False:
        reviews = ref_l4_reviews.load_ref_l4(None if ref_l4 is True else ref_l4, ref_l4_reviews.joinable_variants(name))
    dataset_name = dataset_name or name
    if name == REFCOCO_M:
        return _import_refcoco_m(
            dataset_name, splits, images_dir, max_samples, skip_missing, source, revision, chunk_size,
            missing_report, progress, label,
        )
    src = open_source(name, source, revision)
    tables = src.select(splits)
    if name == COMBINED:
        print(src.removed_text())
    dataset, existing = _existing(dataset_name, name, src.key_fields)
    plan = _plan(src, tables, existing, max_samples)

    missing = _Missing([])
    if plan.rows:
        if images_dir is None:
            images_dir = _fetch_from_zoo(plan, zoo_kwargs)
        images_dir = os.path.abspath(os.path.expanduser(images_dir))
        needed: dict = {}
        for r in plan.rows:
            path, count = needed.get(r.image.file_name, (os.path.join(images_dir, r.image.file_name), 0))
            needed[r.image.file_name] = (path, count + len(r.keys))
        missing = _missing_images(needed, images_dir, dataset_name, missing_report, skip_missing)
        lost = set(missing.files)
        plan.rows = [r for r in plan.rows if r.image.file_name not in lost]

    dataset = _open_dataset(dataset, dataset_name, name, src.info())
    stats = {"empty_expressions": [], "bad_refs": list(plan.bad_refs)}
    added = _add_in_chunks(dataset, _samples(src, plan.rows, images_dir, stats, label), plan.new, chunk_size, progress)
    dataset = _finish(dataset, name, plan.selected, plan.already_present, added, missing, stats)
    if reviews is not None:
        ref_l4_reviews.join_ref_l4(dataset, source=reviews, progress=progress)
    return dataset


def _import_refcoco_m(dataset_name, splits, images_dir, max_samples, skip_missing, source, revision, chunk_size,
                      missing_report, progress, label) -> fo.Dataset:
    """RefCOCO-M: load the Hub copy with FiftyOne, then add the new expressions in chunks."""
    if images_dir is not None:
        raise InputError("RefCOCO-M ships its images with the annotations; leave images_dir out.")
    if splits is not None and set([splits] if isinstance(splits, str) else splits) != {refcoco_m.SPLIT}:
        raise InputError(f"RefCOCO-M has one split, {refcoco_m.SPLIT!r}; leave splits out.")
    revision = revision or SOURCE_REVISIONS[refcoco_m.HUB_ID]
    hub = refcoco_m.load_refcoco_m(source, revision)
    try:
        refcoco_m.check_schema(hub, revision)
        dataset, existing = _existing(dataset_name, REFCOCO_M, (refcoco_m.KEY_FIELD,))
        selected, present, wanted = refcoco_m.plan(hub, existing, max_samples)
        needed: dict = {}
        for path, ids in zip(hub.values("filepath"), hub.values(f"{refcoco_m.LABEL_FIELD}.detections.id")):
            count = sum(1 for i in ids or [] if i in wanted)
            if count:
                needed[path] = (path, count)
        missing = _missing_images(needed, "the RefCOCO-M copy", dataset_name, missing_report, skip_missing)
        if missing.files:
            lost = set(missing.files)
            wanted = {i for path, ids in zip(hub.values("filepath"),
                                             hub.values(f"{refcoco_m.LABEL_FIELD}.detections.id"))
                      if path not in lost for i in ids or [] if i in wanted}
        origin = refcoco_m.HUB_ID if source is None else os.path.abspath(os.fspath(source))
        info = {"format": "fiftyone-hub", "hub_id": refcoco_m.HUB_ID, "revision": revision, "source": origin}
        dataset = _open_dataset(dataset, dataset_name, REFCOCO_M, info)
        stats = {"empty_expressions": [], "bad_refs": []}
        samples = refcoco_m.refcoco_m_samples(hub, wanted, label, stats)
        added = _add_in_chunks(dataset, samples, len(wanted), chunk_size, progress)
    finally:
        hub.delete()
    return _finish(dataset, REFCOCO_M, selected, present, added, missing, stats)


def _open_dataset(dataset: Optional[fo.Dataset], dataset_name: str, name: str, info: dict) -> fo.Dataset:
    """The dataset to add to, created if need be, with the import recorded before anything is added
    (so that a resumed import finds which variant it holds)."""
    if dataset is None:
        dataset = fo.Dataset(dataset_name)
        dataset.persistent = True
    record = dict(dataset.info.get("refcoco", {}))
    record.update(name=name, **info)
    dataset.info["refcoco"] = record
    dataset.save()
    return dataset


def _finish(dataset: fo.Dataset, name: str, selected: int, present: int, added: int, missing: _Missing,
            stats: dict) -> fo.Dataset:
    """Declare the expression attribute and record the import's summary in ``dataset.info``."""
    if added:
        declare_expression_attribute(dataset, "ground_truth")
    if stats["empty_expressions"]:
        logger.warning("Skipped %d expressions with no text, e.g. %s", len(stats["empty_expressions"]),
                       stats["empty_expressions"][:20])
    bad_refs = stats.get("bad_refs", [])
    if bad_refs:
        logger.warning("Skipped %d refs (%d expressions) whose expressions cannot be told apart, e.g. %s",
                       len(bad_refs), sum(n for _, n in bad_refs), [why for why, _ in bad_refs[:5]])
    schema = dataset.get_field_schema()
    present_splits = set(dataset.distinct("split")) if "split" in schema else set()
    record = dict(dataset.info["refcoco"])
    record["splits"] = [s for s in split_order(name) if s in present_splits]
    record["last_import"] = dict(
        selected=selected,
        added=added,
        already_present=present,
        missing_images=len(missing.files),
        skipped_missing_image=missing.expressions,
        skipped_empty=len(stats["empty_expressions"]),
        skipped_bad_refs=len(bad_refs),  # rows whose sent_ids disagree with their sentences or repeat
        skipped_bad_ref_expressions=sum(n for _, n in bad_refs),
        bad_refs=[why for why, _ in bad_refs[:20]],  # the first ones: where and why
        missing_report=missing.report,
    )
    if NO_TARGET_FIELD in schema:
        record["targets"] = target_counts(dataset)
    dataset.info["refcoco"] = record
    dataset.save()
    logger.info("%s: added %d expressions (%d already present)", dataset.name, added, present)
    return dataset


def target_counts(view) -> dict:
    """How many samples of ``view`` refer to no object, one, or several (gRefCOCO)."""
    counts = {"none": 0, "one": 0, "several": 0}
    for boxes in view.values("ground_truth.detections"):
        n = len(boxes or [])
        counts["none" if n == 0 else "one" if n == 1 else "several"] += 1
    return counts


def _add_in_chunks(dataset: fo.Dataset, samples, total: int, chunk_size: int, progress) -> int:
    """Add ``samples`` ``chunk_size`` at a time, so a failure keeps every earlier chunk."""
    added, chunk = 0, []
    with fiftyone_progress(progress, "adding expressions") as shown, \
            fou.ProgressBar(total=total, progress=shown, iters_str="expressions") as pb:
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
