"""Augmentation: the crop is drawn per expression and keeps its boxes whole (at the borders too),
the phrases it cuts leave the item, colour jitter keeps the hue, flips swap the phrase's left and
right, and the parts combine by name."""

import numpy as np
import pytest

from fiftyone_grounding.data.augment import (CACHEABLE, MIN_CROP, augment_item, box_safe_window, color_jitter,
                                        parse_augment, phrase_crop)
from fiftyone_grounding.errors import ConfigError
from fiftyone_grounding.data.text import swap_left_right

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
    """One phrase with these boxes: every crop holds them whole, at the same pixels."""
    image = _scene()
    height, width = image.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float32)
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(300):
        crop, moved, kept, area = phrase_crop(image, boxes, [len(boxes)], rng)
        assert kept == [0]
        ch, cw = crop.shape[:2]
        sizes.add((ch, cw))
        assert area == pytest.approx(ch * cw / (height * width))
        assert ch >= MIN_CROP * height - 1 and cw >= MIN_CROP * width - 1
        y0, x0 = int(crop[0, 0, 0]) // 4, int(crop[0, 0, 1]) // 3  # where the crop starts
        for box, new in zip(boxes, moved):
            # the box in the image's pixels, and where the crop puts it: the same pixels, whole
            bx0, by0, bx1, by1 = box * [width, height, width, height]
            assert x0 <= bx0 + 1e-6 and y0 <= by0 + 1e-6 and bx1 <= x0 + cw + 1e-6 and by1 <= y0 + ch + 1e-6
            np.testing.assert_allclose(new * [cw, ch, cw, ch] + [x0, y0, x0, y0], [bx0, by0, bx1, by1], atol=1e-3)
            assert ((0 <= new) & (new <= 1)).all()
    assert len(sizes) > 10  # it does crop, by different amounts


# three objects spread over the image, as RefCOCO's same-category distractors are, a phrase each
SPREAD = np.asarray([[0.02, 0.05, 0.22, 0.35], [0.75, 0.1, 0.97, 0.4], [0.4, 0.65, 0.6, 0.95]], np.float32)


def test_the_crop_is_drawn_per_phrase_and_the_phrases_it_cuts_leave():
    """TransVG / CLIP-VG / SwimVG crop per expression. A crop that had to hold all three spread
    boxes would barely crop (its window must span nearly the whole image); a crop per phrase
    keeps far less of the image, and every phrase left in the item still has its box whole."""
    image = _scene(120, 160)
    height, width = image.shape[:2]
    rng = np.random.default_rng(0)
    areas, union_areas, kept_counts = [], [], []
    for _ in range(400):
        crop, moved, kept, area = phrase_crop(image, SPREAD, [1, 1, 1], rng)
        areas.append(area)
        kept_counts.append(len(kept))
        ch, cw = crop.shape[:2]
        y0, x0 = int(crop[0, 0, 0]) // 4, int(crop[0, 0, 1]) // 3
        assert len(moved) == len(kept) >= 1
        for k, new in zip(kept, moved):  # every kept phrase: its box whole, at the same pixels
            bx0, by0, bx1, by1 = SPREAD[k] * [width, height, width, height]
            assert x0 <= bx0 + 1e-6 and y0 <= by0 + 1e-6 and bx1 <= x0 + cw + 1e-6 and by1 <= y0 + ch + 1e-6
            np.testing.assert_allclose(new * [cw, ch, cw, ch] + [x0, y0, x0, y0], [bx0, by0, bx1, by1], atol=1e-3)
        for k in set(range(3)) - set(kept):  # every phrase that left: the crop cuts its box
            bx0, by0, bx1, by1 = SPREAD[k] * [width, height, width, height]
            assert not (x0 <= bx0 + 1e-6 and y0 <= by0 + 1e-6 and bx1 <= x0 + cw + 1e-6 and by1 <= y0 + ch + 1e-6)
        x0u, y0u, x1u, y1u = box_safe_window(width, height, SPREAD, rng)  # the crop of the whole image's boxes
        union_areas.append((x1u - x0u) * (y1u - y0u) / (width * height))
    assert np.mean(areas) < 0.7 and np.mean(union_areas) > 0.85, (np.mean(areas), np.mean(union_areas))
    assert min(kept_counts) == 1 and max(kept_counts) == 3  # sometimes only its own phrase, sometimes all


def test_a_phrase_of_nothing_stays_in_any_crop():
    image = _scene()
    rng = np.random.default_rng(2)
    for _ in range(50):
        _, _, kept, _ = phrase_crop(image, SPREAD[:1], [1, 0], rng)
        assert kept == [0, 1]  # it has no box to cut


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
    assert runs[0][2:] == runs[1][2:]
    flipped = [augment_item(image, boxes, ["the cup on the left"], parse_augment("flip"), np.random.default_rng(s))
               for s in range(40)]
    assert {tuple(p) for _, _, p, _, _ in flipped} == {("the cup on the left",), ("the cup on the right",)}
    assert {(tuple(kept), area) for _, _, _, kept, area in flipped} == {((0,), 1.0)}  # no crop: all kept, all area
