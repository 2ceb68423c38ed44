"""Ref-L4's human review of the RefCOCO, RefCOCO+ and RefCOCOg val/test expressions, joined onto
imported samples.

Ref-L4 (Chen et al., "Revisiting Referring Expression Comprehension Evaluation in the Era of Large
Multimodal Models", arXiv 2406.16866) re-reviewed every val/test expression of the RefCOCO family
and marks the erroneous ones (non-unique phrases, inaccurate boxes, misaligned or ambiguous
phrases) with ``"caption_quality": 0``: RefCOCO 3,054 of 21,586, RefCOCO+ 5,201 of 21,373,
RefCOCOg 675 of 14,498. The files are in the Hugging Face dataset ``JierunChen/Ref-L4``, folder
``refcocos_annotation_reviewed/``: ``refcoco_{val,testA,testB}_reviewed.json``,
``refcoco+_{val,testA,testB}_reviewed.json``, ``refcocog_{val,test}_reviewed.json``.

**Licence: CC BY-NC 4.0 (non-commercial), for evaluation only.** It is printed once per process
when the files are read. Use the fields this module writes to measure a label-error flagger or to
score on the clean subset, not to train a model that is sold.

Schema of a reviewed file (and where it was found)
--------------------------------------------------
- The dataset card (``README.md`` of ``JierunChen/Ref-L4`` on the Hub) says only: "For each
  instance in the 'annotation' field of the ``refcoco(+/g)_[split]_reviewed.json`` files, we
  denote erroneous entries with ``["caption_quality"]=0``". The GitHub repository
  ``JierunChen/Ref-L4`` (README, ``ref_l4/dataloader.py``) reads only Ref-L4's own parquet files,
  not these.
- The keys come from a public audit script that downloaded these files (Hub revision
  ``d62c4f4e5f3a639b34adab34e5c8ffeb39f168c1``) and documents and reads their schema
  (``scripts/run_d1_reviewed.py`` in the code index; its repository is not named there): a
  COCO-like JSON object, one record per (image, expression) pair,

  - ``images[]``: ``id`` (a row id local to the file), ``original_id`` (the COCO image id),
    ``caption`` (the expression), ``tokens_negative``, ``file_name``, ``width``, ``height``;
  - ``annotations[]``: ``id`` (local), ``image_id`` (the ``images[].id`` of its expression),
    ``original_id`` (the COCO annotation id, i.e. REFER's ``ann_id``), ``caption_quality``
    (1 kept, 0 erroneous), ``bbox`` (COCO pixel xywh, unchanged by the review),
    ``tokens_positive``, ``category_id``, ``area``, ``iscrowd``;
  - ``info``, ``licenses``, ``categories``.

- That is exactly the format MDETR's ``scripts/fine-tuning/refexp_coco_format.py``
  (``ashkamath/mdetr``) writes from the REFER refs, with ``caption_quality`` added: one image row
  and one annotation per sentence, refs in file order and each ref's sentences in order,
  ``caption = sentence["sent"]`` (REFER's lower-cased, cleaned text, not ``raw``); it carries no
  ``sent_id`` and no ``ref_id``.

So an entry is identified by its split (the file name), the COCO ``image_id``
(``images[].original_id``), the ``ann_id`` (``annotations[].original_id``) and its text: a sample
matches an entry when its ``split``, ``image_id`` and ``ann_id`` are the entry's and its
``expression`` (the ``raw`` text) equals the entry's ``caption`` once both are reduced to their
lower-cased letters and digits (``raw`` and ``sent`` differ in case, punctuation and spacing).
Entries and samples with the same key (one object described twice the same way) pair in order:
the file's order against ``sent_id`` order, as MDETR wrote them. The card's wording says
``'annotation'``, the files (per the audit) hold ``annotations``: both are read.

What the join writes (bulk ``set_values`` by sample id) on each matched sample:
``ref_l4_caption_quality`` (int, as in the file) and ``ref_l4_wrong`` (bool, caption_quality == 0);
other samples are left alone. Its counts are returned and recorded in
``dataset.info["ref_l4"]``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .. import hub
from ..errors import DownloadError, InputError, SourceError
from ..fiftyone_api import root_dataset
from ..progress import fiftyone_progress
from .base import COMBINED, VARIANTS

logger = logging.getLogger(__name__)

HUB_ID = "JierunChen/Ref-L4"
REVISION = "main"  # the files have not changed since the dataset's first commit (June 2024)
FOLDER = "refcocos_annotation_reviewed"
EVAL_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"),
               "refcocog": ("val", "test")}
QUALITY_FIELD = "ref_l4_caption_quality"
WRONG_FIELD = "ref_l4_wrong"
INFO_KEY = "ref_l4"
LICENCE = (
    "Ref-L4's reviewed RefCOCO/RefCOCO+/RefCOCOg annotations (JierunChen/Ref-L4, arXiv 2406.16866) "
    "are licensed CC BY-NC 4.0: non-commercial use, for evaluation only."
)
_DOWNLOAD_HINT = (
    f"on a machine with internet run `huggingface_hub.snapshot_download({HUB_ID!r}, repo_type='dataset', "
    f"allow_patterns=['{FOLDER}/*'], local_dir=FOLDER)`, copy FOLDER here and pass source=FOLDER "
    "(import_refcoco: ref_l4=FOLDER, CLI: --ref-l4 FOLDER)"
)

_licence_told = False


def file_name(variant: str, split: str) -> str:
    """``refcoco+_testA_reviewed.json`` for (``refcoco+``, ``testA``)."""
    return f"{variant}_{split}_reviewed.json"


@dataclass(frozen=True)
class Entry:
    """One reviewed expression."""

    variant: str
    split: str
    image_id: int  # COCO image id
    ann_id: int  # COCO annotation id (REFER's ann_id)
    caption: str
    quality: int


@dataclass
class Reviews:
    """The reviewed entries read from one folder, per variant."""

    folder: str
    entries: list  # of Entry, in file order
    files: list  # file names read
    missing: list = field(default_factory=list)  # expected file names the folder lacks


def tell_licence() -> None:
    """Print the licence, once per process."""
    global _licence_told
    if not _licence_told:
        print(LICENCE)
        _licence_told = True


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def download(revision: Optional[str] = None) -> str:
    """The folder of the reviewed files in the local Hugging Face cache, downloaded if need be.

    Where the Hub must not or cannot be reached (``hub.hub_offline``), only the cache is read, so
    a missing copy fails at once with one sentence that says what to do.
    """
    import huggingface_hub as hfh

    revision = revision or REVISION
    offline = hub.hub_offline()
    try:
        root = hfh.snapshot_download(HUB_ID, repo_type="dataset", revision=revision,
                                     allow_patterns=[f"{FOLDER}/*"], local_files_only=offline is not None)
    except Exception as err:  # offline, unreachable, not cached: huggingface_hub raises several kinds
        why = f"The Hugging Face Hub cannot be reached ({offline}): could" if offline else "Could"
        raise DownloadError(
            f"{why} not download Ref-L4's reviewed RefCOCO files ({HUB_ID!r}, {FOLDER}/, revision "
            f"{revision!r}) ({_one_line(err)}); {_DOWNLOAD_HINT}."
        ) from err
    return os.path.join(root, FOLDER)


def find_folder(source) -> str:
    """The folder holding the reviewed files: ``source`` itself, or its ``refcocos_annotation_reviewed``."""
    folder = os.path.abspath(os.path.expanduser(os.fspath(source)))
    inner = os.path.join(folder, FOLDER)
    if os.path.isdir(inner):
        return inner
    if not os.path.isdir(folder):
        raise SourceError(f"Ref-L4 source {folder} is not a folder; {_DOWNLOAD_HINT}.")
    return folder


def _fail(path: str, what: str):
    raise SourceError(
        f"{path}: {what}; a Ref-L4 reviewed file is a JSON object with 'images' (id, original_id, caption) "
        "and 'annotations' (image_id, original_id, caption_quality), as in JierunChen/Ref-L4's "
        f"{FOLDER}/ (re-download it: {_DOWNLOAD_HINT})."
    )


def _int(value, path: str, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        _fail(path, f"{where} has a non-integer {key!r}: {value!r:.50}")
    return int(value)


def read_file(path: str, variant: str, split: str) -> list:
    """The entries of one reviewed file, checked; a file that is not JSON or lacks a key is
    refused with a :class:`SourceError` naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        _fail(path, f"not a JSON file ({_one_line(err)})")
    except OSError as err:
        raise SourceError(f"{path}: cannot be read ({_one_line(err)}).") from err
    if not isinstance(payload, dict):
        _fail(path, f"the file holds a JSON {type(payload).__name__}, not an object")
    key = "annotation" if "annotation" in payload and "annotations" not in payload else "annotations"
    missing = [k for k in ("images", key) if not isinstance(payload.get(k), list)]
    if missing:
        _fail(path, f"no list {missing} (its keys: {sorted(payload)[:10]})")
    images = {}
    for i, image in enumerate(payload["images"]):
        where = f"images[{i}]"
        if not isinstance(image, dict) or any(k not in image for k in ("id", "original_id", "caption")):
            lacks = [k for k in ("id", "original_id", "caption") if not isinstance(image, dict) or k not in image]
            _fail(path, f"{where} lacks {lacks}")
        if not isinstance(image["caption"], str):
            _fail(path, f"{where} has a non-text 'caption': {image['caption']!r:.50}")
        images[_int(image["id"], path, where, "id")] = image
    entries = []
    for i, ann in enumerate(payload[key]):
        where = f"{key}[{i}]"
        lacks = [k for k in ("image_id", "original_id", "caption_quality") if not isinstance(ann, dict) or k not in ann]
        if lacks:
            _fail(path, f"{where} lacks {lacks}")
        row = _int(ann["image_id"], path, where, "image_id")
        if row not in images:
            _fail(path, f"{where} has image_id {row}, which no images[] entry has")
        image = images[row]
        entries.append(Entry(
            variant, split,
            image_id=_int(image["original_id"], path, f"images[] id {row}", "original_id"),
            ann_id=_int(ann["original_id"], path, where, "original_id"),
            caption=image["caption"],
            quality=_int(ann["caption_quality"], path, where, "caption_quality"),
        ))
    return entries


def load_ref_l4(source=None, variants: Iterable[str] = VARIANTS, revision: Optional[str] = None) -> Reviews:
    """Read the reviewed files of ``variants``.

    Args:
        source: a folder holding the files (or holding ``refcocos_annotation_reviewed/``), or None
            to download them from the Hugging Face Hub (``JierunChen/Ref-L4``) into its cache.
        variants: any of ``"refcoco"``, ``"refcoco+"``, ``"refcocog"``.
        revision: the Hub revision (default ``REVISION``); only with ``source=None``.
    """
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in EVAL_SPLITS]
    if unknown:
        raise InputError(f"Ref-L4 reviewed {list(EVAL_SPLITS)}, not {unknown}.")
    folder = download(revision) if source is None else find_folder(source)
    entries, files, missing = [], [], []
    for variant in variants:
        for split in EVAL_SPLITS[variant]:
            name = file_name(variant, split)
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                entries.extend(read_file(path, variant, split))
                files.append(name)
            else:
                missing.append(name)
    if not files:
        raise SourceError(
            f"{folder} holds none of Ref-L4's reviewed files {missing}; pass the folder "
            f"{FOLDER}/ of JierunChen/Ref-L4 ({_DOWNLOAD_HINT})."
        )
    if missing:
        logger.warning("Ref-L4: %s lacks %s; their expressions are not joined", folder, missing)
    tell_licence()
    return Reviews(folder, entries, files, missing)


def joinable_variants(name: str) -> tuple:
    """The Ref-L4 variants a dataset imported as ``name`` holds, or an :class:`InputError`."""
    if name in EVAL_SPLITS:
        return (name,)
    if name == COMBINED:
        return tuple(EVAL_SPLITS)
    raise InputError(
        f"Ref-L4 reviewed RefCOCO, RefCOCO+ and RefCOCOg (and so refcocox), not {name!r}; pass "
        "dataset_name='refcoco', 'refcoco+' or 'refcocog' for a dataset of those samples."
    )


def _text_key(text) -> str:
    """The expression as compared: lower-cased letters and digits only (REFER's ``sent`` is
    ``raw`` lower-cased with punctuation removed and tokens re-spaced)."""
    return "".join(c for c in str(text or "").casefold() if c.isalnum())


def join_ref_l4(view_or_dataset, source=None, dataset_name: Optional[str] = None,
                progress=True) -> dict:
    """Write Ref-L4's review onto the matching samples of an imported RefCOCO-family dataset.

    Each sample of ``view_or_dataset`` that a reviewed entry matches (same split, ``image_id``,
    ``ann_id`` and text; see the module's docstring) gets ``ref_l4_caption_quality`` (the file's
    int) and ``ref_l4_wrong`` (True where it is 0), written in bulk; no other sample is touched.
    Licence of the files: CC BY-NC 4.0, evaluation only (printed once when they are read).

    Args:
        view_or_dataset: a dataset imported by ``import_refcoco`` (refcoco, refcoco+, refcocog or
            refcocox), or a view of one; samples need ``split``, ``image_id``, ``ann_id``,
            ``expression`` (and ``sent_id``, ``source`` for refcocox).
        source: a folder of the reviewed files, None to download them from the Hub, or what
            :func:`load_ref_l4` returned.
        dataset_name: the variant the samples are (``"refcoco"``, ``"refcoco+"``, ``"refcocog"``);
            None reads it from ``dataset.info["refcoco"]["name"]``, which the importer records.
        progress: FiftyOne's progress for the writes (True/False/None or a callback).

    Returns:
        counts: ``entries`` (reviewed entries read for these variants), ``matched`` (samples
        given the fields), ``wrong`` (of those, caption_quality 0), ``not_reviewed`` (samples of
        the view no entry matched, e.g. the train split), ``entries_without_sample`` (entries no
        sample of the view matched), plus ``files`` read and ``missing_files``.
    """
    dataset = root_dataset(view_or_dataset)
    name = dataset_name or dataset.info.get("refcoco", {}).get("name")
    if name is None:
        raise InputError(
            f"Dataset {dataset.name!r} does not record which RefCOCO variant it holds (it was not made by "
            "import_refcoco); pass dataset_name='refcoco', 'refcoco+' or 'refcocog'."
        )
    variants = joinable_variants(name)
    combined = name == COMBINED
    fields = ["id", "split", "image_id", "ann_id", "expression", "sent_id"] + (["source"] if combined else [])
    schema = view_or_dataset.get_field_schema()
    absent = [f for f in fields[1:] if f not in schema]
    if absent:
        raise InputError(
            f"The samples of {dataset.name!r} have no field(s) {absent}; Ref-L4 is joined on split, image_id, "
            "ann_id and expression, as import_refcoco writes them for refcoco, refcoco+ and refcocog."
        )
    reviews = source if isinstance(source, Reviews) else load_ref_l4(source, variants)

    entries = defaultdict(list)  # key -> qualities, in file order
    n_entries = 0
    for e in reviews.entries:
        if e.variant in variants:
            entries[(e.variant, e.split, e.image_id, e.ann_id, _text_key(e.caption))].append(e.quality)
            n_entries += 1

    samples = defaultdict(list)  # key -> (sent_id, sample id)
    values = view_or_dataset.values(fields)
    n_samples = len(values[0])
    for i in range(n_samples):
        sample_id, split, image_id, ann_id, text, sent_id = (column[i] for column in values[:6])
        variant = values[6][i] if combined else name
        if combined and isinstance(split, str) and "/" in split:
            split = split.split("/", 1)[1]
        if image_id is None or ann_id is None or variant not in variants:
            continue
        key = (variant, split, int(image_id), int(ann_id), _text_key(text))
        samples[key].append((-1 if sent_id is None else int(sent_id), sample_id))

    quality = {}
    unmatched_entries = 0
    for key, qualities in entries.items():
        matched = sorted(samples.get(key, []))
        for q, (_, sample_id) in zip(qualities, matched):
            quality[sample_id] = q
        unmatched_entries += max(0, len(qualities) - len(matched))

    if quality:
        with fiftyone_progress(progress, "writing Ref-L4's review") as shown:
            dataset.set_values(QUALITY_FIELD, quality, key_field="id", progress=shown)
            dataset.set_values(WRONG_FIELD, {i: q == 0 for i, q in quality.items()}, key_field="id",
                               progress=shown)
    counts = dict(
        entries=n_entries,
        matched=len(quality),
        wrong=sum(1 for q in quality.values() if q == 0),
        not_reviewed=n_samples - len(quality),
        entries_without_sample=unmatched_entries,
        files=list(reviews.files),
        missing_files=list(reviews.missing),
    )
    dataset.info[INFO_KEY] = dict(counts, source=reviews.folder, licence=LICENCE)
    dataset.save()
    logger.info("Ref-L4: %d of %d samples reviewed, %d marked wrong", counts["matched"], n_samples, counts["wrong"])
    return counts
