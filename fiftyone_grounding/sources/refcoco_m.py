"""RefCOCO-M (``Voxel51/RefCOCO-M``): a cleaned RefCOCO (UNC) val with pixel-accurate masks.

Voxel51 publishes it in FiftyOne's Hub format (``fiftyone.yml`` + a ``FiftyOneDataset`` export):
1,190 image samples with ``filepath``, ``image_id``, ``file_name`` and a ``detections`` field
holding one ``Detection`` per referring expression (5,598): ``label`` is the expression,
``bounding_box`` relative xywh, ``mask`` the instance mask cropped to the box, plus ``category``,
``supercategory`` and ``ref_id``; expressions of one object share its box and mask.

:func:`load_refcoco_m` loads it with ``fiftyone.utils.huggingface.load_from_hub`` (or a local
copy, with the same FiftyOne importer ``load_from_hub`` ends in); :func:`refcoco_m_samples`
rewrites it in the project's schema: one sample per expression, its box labelled ``referent`` with
the expression as the box's ``expression`` attribute and the mask kept on it, split ``val``.
The import key is the Hub's own detection id (``refcoco_m_id``), which exports keep.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterator, Optional

import fiftyone as fo

from ..data.labels import detection_xyxy, make_box_detections
from ..errors import DownloadError, SourceError
from .base import HUB_IDS, REFCOCO_M, SOURCE_REVISIONS

HUB_ID = HUB_IDS[REFCOCO_M]
SPLIT = "val"
KEY_FIELD = "refcoco_m_id"
LABEL_FIELD = "detections"  # the Hub dataset's field of expression detections


def load_refcoco_m(source=None, revision: Optional[str] = None) -> fo.Dataset:
    """RefCOCO-M as FiftyOne loads it, in a temporary (non-persistent) dataset; delete it when done.

    Args:
        source: None to call ``load_from_hub("Voxel51/RefCOCO-M", revision=...)``; or a local
            copy of the Hub repository (a folder with ``fiftyone.yml``, ``metadata.json``,
            ``samples.json`` and ``data/``, e.g. from ``huggingface_hub.snapshot_download(
            "Voxel51/RefCOCO-M", repo_type="dataset", local_dir=FOLDER)``).
        revision: the Hub revision (default: ``base.SOURCE_REVISIONS``).
    """
    revision = revision or SOURCE_REVISIONS[HUB_ID]
    name = f"refcoco-m-source-{uuid.uuid4().hex[:8]}"
    if source is None:
        # FiftyOne 1.x reaches huggingface_hub.utils as an attribute of the package, which
        # huggingface_hub only sets once the submodule is imported.
        import huggingface_hub.utils  # noqa: F401
        from fiftyone.utils.huggingface import load_from_hub

        try:
            return load_from_hub(HUB_ID, revision=revision, name=name, persistent=False, overwrite=True)
        except Exception as err:  # offline, unreachable, rate limited: several libraries raise
            raise DownloadError(
                f"Could not load {HUB_ID!r} (revision {revision!r}) from the Hugging Face Hub "
                f"({type(err).__name__}: {err}); on a machine with internet run `huggingface_hub."
                f"snapshot_download({HUB_ID!r}, repo_type='dataset', revision={revision!r}, "
                "local_dir=FOLDER)`, copy FOLDER here and pass source=FOLDER (CLI: --source FOLDER)."
            ) from err
    folder = os.fspath(source)
    if not os.path.isfile(os.path.join(folder, "samples.json")) or not os.path.isfile(
        os.path.join(folder, "metadata.json")
    ):
        raise SourceError(
            f"{folder} is not a local copy of {HUB_ID} (a FiftyOne dataset export with fiftyone.yml, "
            "metadata.json, samples.json and data/); download it with `huggingface_hub.snapshot_download("
            f"{HUB_ID!r}, repo_type='dataset', local_dir=FOLDER)`."
        )
    return fo.Dataset.from_dir(folder, dataset_type=fo.types.FiftyOneDataset, name=name, persistent=False)


def check_schema(hub: fo.Dataset, revision: Optional[str]) -> None:
    """Refuse a copy whose fields are not RefCOCO-M's (of the revision the importer expects)."""
    field = hub.get_field_schema().get(LABEL_FIELD)
    if not (isinstance(field, fo.EmbeddedDocumentField) and issubclass(field.document_type, fo.Detections)):
        fields = sorted(hub.get_field_schema())
        raise SourceError(
            f"This copy of {HUB_ID} has no Detections field {LABEL_FIELD!r} (its fields: {fields}); the "
            f"importer expects the fields of revision {revision or SOURCE_REVISIONS[HUB_ID]!r}: filepath, "
            f"image_id, file_name and {LABEL_FIELD} (label = the expression, bounding_box, mask, category, "
            "ref_id). Pass the revision your copy was saved from (revision=..., CLI: --revision)."
        )


def plan(hub: fo.Dataset, existing: set, max_samples: Optional[int]) -> tuple:
    """``(selected, already present, new detection ids)`` of the Hub copy, in its order."""
    ids = [i for sample_ids in hub.values(f"{LABEL_FIELD}.detections.id") for i in (sample_ids or [])]
    if max_samples is not None:
        ids = ids[:max_samples]
    new = [i for i in ids if i not in existing]
    return len(ids), len(ids) - len(new), set(new)


def refcoco_m_samples(hub: fo.Dataset, wanted: set, label: str, stats: dict) -> Iterator[fo.Sample]:
    """One sample per wanted expression detection of the Hub copy, in the project's schema."""
    for sample in hub.iter_samples():
        dets = [d for d in (sample[LABEL_FIELD].detections if sample[LABEL_FIELD] else []) if d.id in wanted]
        if not dets:
            continue
        metadata = sample.metadata
        if metadata is None or metadata.width is None:
            metadata = fo.ImageMetadata.build_for(sample.filepath)
        for det in dets:
            text = det.label if isinstance(det.label, str) else ""
            if not text.strip():
                stats["empty_expressions"].append(det.id)
                continue
            box = detection_xyxy(det.bounding_box)
            if box is None:
                raise SourceError(f"{HUB_ID} sample {sample.filepath}: detection {det.id} has no bounding box.")
            extra = {k: det[k] for k in ("mask", "mask_path") if det.has_field(k) and det[k] is not None}
            yield fo.Sample(
                filepath=sample.filepath,
                tags=[SPLIT],
                metadata=metadata,
                expression=text,
                ground_truth=make_box_detections([box], text, label=label, per_box=[extra]),
                split=SPLIT,
                image_id=_int_or_none(sample["image_id"] if sample.has_field("image_id") else None),
                ref_id=_int_or_none(det["ref_id"] if det.has_field("ref_id") else None),
                category=det["category"] if det.has_field("category") else None,
                supercategory=det["supercategory"] if det.has_field("supercategory") else None,
                **{KEY_FIELD: det.id},
            )


def _int_or_none(value) -> Optional[int]:
    return None if value is None else int(value)

