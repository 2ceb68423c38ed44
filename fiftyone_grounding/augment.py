"""Training augmentation: image, boxes and phrases change together (detr's ``datasets/transforms.py``).

``TrainConfig.augment`` names a set of parts joined by ``+`` (or ``"none"``):

- ``scale``: a random crop that keeps every target box of the image whole, resized back to the
  training size (a random zoom of up to 1 / ``MIN_CROP``). Each side is chosen apart: the crop
  starts at or before the leftmost box edge and ends at or after the rightmost one (TransVG's
  crop compared the box centre with the crop corner, x and y swapped, and could cut the box).
- ``color``: brightness, contrast and saturation jitter, never hue (the phrases name colours).
- ``flip``: a horizontal mirror with left and right swapped in the phrases (``text.swap_left_right``:
  "leftmost", "to the left of", "on the right side" too). Off by default: CLIP-VG, HiVG, OneRef and
  SwimVG turn it off as harmful to grounding.

Each part applies with probability 1/2, drawn from the item's own random generator. ``flip`` alone
works from the feature cache (two cached views); the others need pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import ConfigError
from .text import swap_left_right

PARTS = ("scale", "color", "flip")
ALIASES = {"crop-flip": "scale+flip"}  # the name of scale+flip before the parts could be combined
CACHEABLE = frozenset({"flip"})  # what the feature cache's two views can serve
MIN_CROP = 0.6  # the smallest crop side, as a share of the image's
COLOR_JITTER = 0.3  # brightness, contrast and saturation scale by up to 1 +- this


def parse_augment(augment: str) -> frozenset:
    """``"scale+color"`` -> {"scale", "color"}; ``"none"`` -> {}; unknown parts are refused by name."""
    if not isinstance(augment, str):
        raise ConfigError(f"augment must be a string such as 'scale+color' or 'none', got {augment!r}")
    augment = ALIASES.get(augment, augment)
    if augment == "none":
        return frozenset()
    parts = frozenset(p.strip() for p in augment.split("+"))
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ConfigError(f"Unknown augmentation {unknown}: combine {PARTS} with '+', e.g. 'scale+color', or 'none'")
    return parts


def box_safe_crop(image: np.ndarray, boxes_xyxy: np.ndarray, rng: np.random.Generator,
                  min_crop: float = MIN_CROP) -> tuple[np.ndarray, np.ndarray]:
    """A random crop of an (H, W, C) image that holds every normalized xyxy box (N, 4) whole;
    returns the crop and the boxes in its normalized coordinates."""
    height, width = image.shape[:2]
    union = boxes_xyxy.astype(np.float64)  # (float32 would round an edge into the pixel before)
    if not len(union):  # no box to keep (a phrase of nothing): the crop holds the image's centre
        union = np.array([[0.5, 0.5, 0.5, 0.5]])
    x0, x1 = _crop_span(width, union[:, 0].min() * width, union[:, 2].max() * width, rng, min_crop)
    y0, y1 = _crop_span(height, union[:, 1].min() * height, union[:, 3].max() * height, rng, min_crop)
    scale = np.array([width, height, width, height], dtype=np.float64)
    offset = np.array([x0, y0, x0, y0], dtype=np.float64)
    size = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=np.float64)
    boxes = np.clip((boxes_xyxy.astype(np.float64) * scale - offset) / size, 0.0, 1.0)
    return np.ascontiguousarray(image[y0:y1, x0:x1]), boxes.astype(np.float32)


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
                 rng: np.random.Generator):
    """Apply the parts of ``parts``, each with probability 1/2, in the order scale, colour, flip."""
    if "scale" in parts and rng.random() < 0.5:
        image, boxes_xyxy = box_safe_crop(image, boxes_xyxy, rng)
    if "color" in parts and rng.random() < 0.5:
        image = color_jitter(image, rng)
    if "flip" in parts and rng.random() < 0.5:
        image, boxes_xyxy, phrases = hflip(image, boxes_xyxy, phrases)
    return image, boxes_xyxy, phrases
