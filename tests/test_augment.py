"""Augmentation: the crop keeps every box whole (at the borders too), colour jitter keeps the hue,
flips swap the phrase's left and right, and the parts combine by name."""

import numpy as np
import pytest

from fiftyone_grounding.augment import (CACHEABLE, MIN_CROP, augment_item, box_safe_crop, color_jitter,
                                        parse_augment)
from fiftyone_grounding.errors import ConfigError
from fiftyone_grounding.text import swap_left_right

BORDER_BOXES = [
    [[0.0, 0.0, 0.2, 0.3]],  # top-left corner
    [[0.8, 0.7, 1.0, 1.0]],  # bottom-right corner
    [[0.0, 0.4, 1.0, 0.6]],  # full width
    [[0.45, 0.0, 0.55, 1.0]],  # full height
    [[0.05, 0.1, 0.15, 0.2], [0.85, 0.8, 0.95, 0.9]],  # two far apart: the crop holds both
    [[0.3, 0.3, 0.31, 0.31]],  # tiny
]


def _scene(height=60, width=80):
    """An image whose pixel (y, x) encodes its own coordinates, so a crop's place can be read back."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([ys * 4, xs * 3, np.full_like(ys, 7)], -1).astype(np.uint8)


@pytest.mark.parametrize("boxes", BORDER_BOXES)
def test_the_crop_never_cuts_a_box(boxes):
    image = _scene()
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32)
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(300):
        crop, moved = box_safe_crop(image, boxes, rng)
        ch, cw = crop.shape[:2]
        sizes.add((ch, cw))
        assert ch >= MIN_CROP * height - 1 and cw >= MIN_CROP * width - 1
        y0, x0 = int(crop[0, 0, 0]) // 4, int(crop[0, 0, 1]) // 3  # where the crop starts
        for box, new in zip(boxes, moved):
            # the box in the image's pixels, and where the crop puts it: the same pixels, whole
            bx0, by0, bx1, by1 = box * [width, height, width, height]
            assert x0 <= bx0 + 1e-6 and y0 <= by0 + 1e-6 and bx1 <= x0 + cw + 1e-6 and by1 <= y0 + ch + 1e-6
            np.testing.assert_allclose(new * [cw, ch, cw, ch] + [x0, y0, x0, y0], [bx0, by0, bx1, by1], atol=1e-3)
            assert ((0 <= new) & (new <= 1)).all()
    assert len(sizes) > 10  # it does crop, by different amounts


def test_colour_jitter_keeps_the_hue():
    rng = np.random.default_rng(1)
    image = np.zeros((4, 6, 3), np.uint8)
    image[:, :2] = (200, 30, 30)  # red
    image[:, 2:4] = (40, 160, 60)  # green
    image[:, 4:] = (120, 120, 120)  # grey
    for _ in range(100):
        out = color_jitter(image, rng).astype(int)
        assert (out[:, :2, 0] > out[:, :2, 1]).all() and (out[:, :2, 0] > out[:, :2, 2]).all()
        assert (out[:, 2:4, 1] > out[:, 2:4, 0]).all() and (out[:, 2:4, 1] > out[:, 2:4, 2]).all()
        assert (np.ptp(out[:, 4:], axis=-1) <= 1).all()  # grey stays grey
    assert not np.array_equal(color_jitter(image, rng), image)


@pytest.mark.parametrize("phrase, swapped", [
    ("the leftmost cup", "the rightmost cup"),
    ("the dog to the left of the car", "the dog to the right of the car"),
    ("man on the right side", "man on the left side"),
    ("Left person, RIGHT hand", "Right person, LEFT hand"),
    ("the bright light", "the bright light"),  # whole words only
    ("the leftover pizza on the left", "the leftover pizza on the right"),
    ("second from the right", "second from the left"),
])
def test_a_flip_swaps_left_and_right_in_the_phrase(phrase, swapped):
    assert swap_left_right(phrase) == swapped
    assert swap_left_right(swapped) == phrase or "bright" in phrase or "leftover" in phrase


def test_parts_combine_by_name():
    assert parse_augment("none") == frozenset()
    assert parse_augment("scale+color") == {"scale", "color"}
    assert parse_augment("crop-flip") == {"scale", "flip"}  # the earlier name
    assert parse_augment("flip") <= CACHEABLE and not parse_augment("scale+flip") <= CACHEABLE
    with pytest.raises(ConfigError, match=r"Unknown augmentation \['rotate'\]"):
        parse_augment("scale+rotate")


def test_an_item_is_augmented_the_same_from_the_same_seed():
    image = _scene()
    boxes = np.asarray([[0.1, 0.2, 0.4, 0.5]], np.float32)
    parts = parse_augment("scale+color+flip")
    runs = [augment_item(image, boxes, ["the cup on the left"], parts, np.random.default_rng([3, 1, 7]))
            for _ in range(2)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2]
    flipped = [augment_item(image, boxes, ["the cup on the left"], parse_augment("flip"), np.random.default_rng(s))
               for s in range(40)]
    assert {tuple(p) for _, _, p in flipped} == {("the cup on the left",), ("the cup on the right",)}
