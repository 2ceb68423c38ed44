"""Checks shared by the table sources (jxu124, REFER, gRefCOCO): COCO image records, pixel boxes
made relative, COCO categories and a ref's expressions, each refusing a bad row with where and why."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..errors import SourceError
from ..models.boxes import box_xywh_to_xyxy, box_xyxy_abs_to_rel, is_valid_xyxy
from .base import Image

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


def row_sent_ids(row) -> tuple:
    """The sent_ids of a ref: its ``sent_ids`` column, or where it has none its sentences' ids."""
    listed = row.get("sent_ids")
    if listed is None:
        listed = [s.get("sent_id") for s in row.get("sentences") or [] if isinstance(s, dict)]
    return tuple(int(s) for s in listed or [])
