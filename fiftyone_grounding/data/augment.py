"""Training augmentation: image, boxes and phrases change together (detr's ``datasets/transforms.py``).

``TrainConfig.augment`` names a set of parts joined by ``+`` (or ``"none"``):

- ``scale``: a random crop per expression, as TransVG, CLIP-VG and SwimVG crop: it keeps one
  phrase's boxes whole (a phrase of the item drawn at random), resized back to the training size
  (a random zoom of up to 1 / ``MIN_CROP``); the item's other phrases stay only where the crop
  holds every box of theirs whole too, the others leave the item for this epoch. (A crop that
  had to hold every phrase's boxes barely crops: RefCOCO's referred objects, about 2.5 per
  image, are spread across the frame.) Each side is chosen apart: the crop starts at or before
  the leftmost box edge and ends at or after the rightmost one (TransVG's crop compared the box
  centre with the crop corner, x and y swapped, and could cut the box).
- ``color``: brightness, contrast and saturation jitter, never hue (the phrases name colours).
- ``flip``: a horizontal mirror with left and right swapped in the phrases (``text.swap_left_right``:
  "leftmost", "to the left of", "on the right side" too). Off by default: CLIP-VG, HiVG, OneRef and
  SwimVG turn it off as harmful to grounding.

Each part applies with probability 1/2, drawn from the item's own random generator. ``flip`` alone
works from the feature cache (two cached views); the others need pixels.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..models.boxes import clip_to_image
from .text import swap_left_right

PARTS = ("scale", "color", "flip")
CACHEABLE = frozenset({"flip"})  # what the feature cache's two views can serve
MIN_CROP = 0.6  # the smallest crop side, as a share of the image's
COLOR_JITTER = 0.3  # brightness, contrast and saturation scale by up to 1 +- this


def parse_augment(augment: str) -> frozenset:
    """``"scale+color"`` -> {"scale", "color"}; ``"none"`` -> {}; unknown parts are refused by name."""
    if not isinstance(augment, str):
        raise ConfigError(f"augment must be a string such as 'scale+color' or 'none', got {augment!r}")
    if augment == "none":
        return frozenset()
    parts = frozenset(p.strip() for p in augment.split("+"))
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ConfigError(f"Unknown augmentation {unknown}: combine {PARTS} with '+', e.g. 'scale+color', or 'none'")
    return parts


def box_safe_window(width: int, height: int, boxes_xyxy: np.ndarray, rng: np.random.Generator,
                    min_crop: float = MIN_CROP) -> tuple[int, int, int, int]:
    """A random crop window (x0, y0, x1, y1) in pixels of a ``width`` x ``height`` image that holds
    every normalized xyxy box (N, 4) whole, each side at least ``min_crop`` of the image's."""
    union = boxes_xyxy.astype(np.float64)  # (float32 would round an edge into the pixel before)
    if not len(union):  # no box to keep (a phrase of nothing): the crop holds the image's centre
        union = np.array([[0.5, 0.5, 0.5, 0.5]])
    x0, x1 = _crop_span(width, union[:, 0].min() * width, union[:, 2].max() * width, rng, min_crop)
    y0, y1 = _crop_span(height, union[:, 1].min() * height, union[:, 3].max() * height, rng, min_crop)
    return x0, y0, x1, y1


def crop_boxes(boxes_xyxy: np.ndarray, window: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Normalized xyxy boxes (N, 4) of the image -> in the normalized coordinates of the crop
    ``window`` (pixels), clipped to it."""
    x0, y0, x1, y1 = window
    scale = np.array([width, height, width, height], dtype=np.float64)
    offset = np.array([x0, y0, x0, y0], dtype=np.float64)
    size = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=np.float64)
    return clip_to_image((boxes_xyxy.astype(np.float64) * scale - offset) / size).astype(np.float32)


def inside_window(boxes_xyxy: np.ndarray, window: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """(N,) True where a normalized xyxy box lies whole inside the crop ``window`` (pixels)."""
    x0, y0, x1, y1 = window
    pixels = boxes_xyxy.astype(np.float64) * np.array([width, height, width, height], dtype=np.float64)
    eps = 1e-6
    return ((pixels[:, 0] >= x0 - eps) & (pixels[:, 1] >= y0 - eps)
            & (pixels[:, 2] <= x1 + eps) & (pixels[:, 3] <= y1 + eps))


def phrase_crop(image: np.ndarray, boxes_xyxy: np.ndarray, sizes: Sequence[int], rng: np.random.Generator,
                min_crop: float = MIN_CROP):
    """The per-expression crop: one phrase with boxes drawn at random (its ``sizes[k]`` boxes), a random
    window that holds its boxes whole, and the phrases that window holds whole. ``boxes_xyxy``
    (M, 4): every phrase's boxes back to back, ``sizes`` how many each has (a phrase of nothing
    has 0 and stays in any crop). Returns (the cropped image, the kept phrases' boxes in its
    coordinates, the kept phrases' indices, the crop's share of the image's area)."""
    height, width = image.shape[:2]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    with_boxes = [k for k in range(len(sizes)) if sizes[k]] or list(range(len(sizes)))  # a phrase of nothing: no anchor
    anchor = with_boxes[int(rng.integers(len(with_boxes)))]
    window = box_safe_window(width, height, boxes_xyxy[starts[anchor]:starts[anchor + 1]], rng, min_crop)
    whole = inside_window(boxes_xyxy, window, width, height)  # (M,)
    keep = [k for k in range(len(sizes)) if whole[starts[k]:starts[k + 1]].all()]
    kept_boxes = np.concatenate([boxes_xyxy[starts[k]:starts[k + 1]] for k in keep]).reshape(-1, 4)
    x0, y0, x1, y1 = window
    area = (x1 - x0) * (y1 - y0) / float(width * height)
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    return crop, crop_boxes(kept_boxes, window, width, height), keep, area


def _crop_span(size: int, lo: float, hi: float, rng: np.random.Generator, min_crop: float) -> tuple[int, int]:
    """Integer [start, end) within [0, size) holding [lo, hi], at least ``min_crop`` of ``size`` long."""
    lo, hi = int(np.floor(max(lo, 0.0))), int(np.ceil(min(hi, size)))
    shortest = max(hi - lo, int(np.ceil(min_crop * size)), 1)
    length = int(rng.integers(min(shortest, size), size + 1))
    # it must begin by lo and reach hi: first <= last since hi - lo <= length <= size
    first, last = max(0, hi - length), min(lo, size - length)
    start = int(rng.integers(first, last + 1))
    return start, start + length


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = COLOR_JITTER) -> np.ndarray:
    """Brightness, contrast and saturation of an (H, W, 3) uint8 image scaled by random factors
    in [1 - strength, 1 + strength]; the hue stays."""
    x = image.astype(np.float32)
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, 3)
    x = x * brightness
    x = (x - x.mean()) * contrast + x.mean()
    gray = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    x = gray + (x - gray) * saturation
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def hflip_boxes(boxes_xyxy: np.ndarray) -> np.ndarray:
    """Mirror normalized xyxy boxes (N, 4) left-right."""
    boxes = boxes_xyxy.copy()
    boxes[:, [0, 2]] = 1.0 - boxes_xyxy[:, [2, 0]]
    return boxes


def hflip(image: np.ndarray, boxes_xyxy: np.ndarray, phrases: Sequence[str]):
    """Horizontal flip of an (H, W, C) image, its normalized xyxy boxes and phrases."""
    image = np.ascontiguousarray(image[:, ::-1])
    return image, hflip_boxes(boxes_xyxy), [swap_left_right(p) for p in phrases]


def augment_item(image: np.ndarray, boxes_xyxy: np.ndarray, phrases: list[str], parts: frozenset,
                 rng: np.random.Generator, sizes: Optional[Sequence[int]] = None):
    """Apply the parts of ``parts``, each with probability 1/2, in the order scale, colour, flip.

    ``boxes_xyxy`` (M, 4): the phrases' boxes back to back, ``sizes`` how many each phrase has
    (None: one each). Returns (image, boxes, phrases, kept, crop area): ``kept`` the indices of the
    phrases still in the item (a crop may leave some out), ``crop area`` the share of the image
    the crop kept (1.0 uncropped)."""
    sizes = [1] * len(phrases) if sizes is None else list(sizes)
    kept, area = list(range(len(phrases))), 1.0
    if "scale" in parts and rng.random() < 0.5:
        image, boxes_xyxy, kept, area = phrase_crop(image, boxes_xyxy, sizes, rng)
        phrases = [phrases[k] for k in kept]
    if "color" in parts and rng.random() < 0.5:
        image = color_jitter(image, rng)
    if "flip" in parts and rng.random() < 0.5:
        image, boxes_xyxy, phrases = hflip(image, boxes_xyxy, phrases)
    return image, boxes_xyxy, phrases, kept, area
