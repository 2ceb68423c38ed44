"""The built-in synthetic referring-expression dataset (the offline default).

Each image shows a few coloured shapes on a dark background; each referring
expression picks exactly one of them out, e.g. "the small red circle" or
"the blue square on the left". The task is built to be learnable by a small
model yet honest:

- Objects never overlap (a margin separates them) and lie fully inside the image;
  "small" and "large" size ranges are far apart; the colours are far apart.
- A phrase names the fewest of colour / shape / size that single the target out
  (sometimes one redundant attribute more, so phrases are not a fixed function of
  the scene). When look-alikes exist (same colour, shape and size), a spatial word
  ("left", "right", "top", "bottom") compares the target with them along the axis
  where they are best separated. A fraction of the images deliberately holds a
  look-alike pair, so spatial words are common.
- Nothing of the answer is in the image beyond the drawn shapes, and
  :func:`resolve` proves that every phrase denotes its target alone.

Phrases use whole words only, so a horizontal flip of the image can be matched by
swapping "left" <-> "right" in the phrase; all shapes (circle, square, upright
isosceles triangle) are mirror-symmetric, so their names survive the flip.

One FiftyOne sample per referring expression; the expressions of an image share
its PNG file and its split.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

import fiftyone as fo

from .fields import DEFAULT_LABEL, IMAGE_KINDS_FIELD, NO_TARGET_FIELD, REFERENT_KIND_FIELD
from ..errors import InputError
from ..models.boxes import clip_box_to_image
from .labels import declare_expression_attribute, make_box_detections, make_detections
from ..progress import bar, fiftyone_progress

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 245),
    "yellow": (240, 220, 40),
    "white": (235, 235, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Side of an object's (square) box as a fraction of the image side. The gap
# between the ranges keeps "small" and "large" unambiguous at 64 px (7-10 px vs 16-20 px).
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.11, 0.16),
    "large": (0.25, 0.32),
}
BACKGROUND: tuple[int, int, int] = (24, 24, 24)
# Per-channel uniform jitter of an object's colour, so colours are ranges, not exact values.
COLOR_JITTER = 12

# Phrase order is "the [size] [colour] [shape|object] [spatial]".
ATTRIBUTES: tuple[str, ...] = ("size", "color", "shape")
NOUN_WITHOUT_SHAPE = "object"
SPATIAL_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Which box-centre coordinate a spatial word compares, and whether it picks the minimum.
_SPATIAL_AXIS: dict[str, tuple[int, bool]] = {
    "left": (0, True),
    "right": (0, False),
    "top": (1, True),
    "bottom": (1, False),
}
# A spatial word only denotes one object when that object's centre is more than
# this (relative) distance ahead of every other candidate's along the axis.
SPATIAL_TOLERANCE = 0.08

VOCABULARY: list[str] = (
    ["the", NOUN_WITHOUT_SHAPE, "on", "at"]
    + list(SPATIAL_PHRASES)
    + list(SIZES)
    + list(COLORS)
    + list(SHAPES)
)

# Relational phrases: "the circle to the left of the blue square". The target is told apart
# from objects of its own description only by where it stands against another object, the
# anchor (which its own attributes single out): the image must be read in the light of the
# phrase. (axis, sign): the target's centre minus the anchor's along the axis, times the sign,
# must pass RELATION_TOLERANCE, and every other object of the target's description must stay
# clearly short of it.
RELATIONS: dict[str, tuple[int, int]] = {
    "to the left of": (0, -1),
    "to the right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}
RELATION_TOLERANCE = 0.1
RELATION_MARGIN = 0.04  # the target passes the tolerance by this much, the others fall short by it
RELATION_WORDS: list[str] = ["to", "of", "above", "below"]

# Phrases of several objects ("all the red shapes", "every small circle", "the two squares",
# "both blue objects") and of none ("the green triangle" where this image has no green triangle
# but has green things or triangles: deceptive, as gRefCOCO's no-target phrases).
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           NOUN_WITHOUT_SHAPE: "shapes"}
COUNT_WORDS: dict[str, int] = {"two": 2, "three": 3, "both": 2}
SEVERAL_WORDS: list[str] = ["all", "every", "objects"] + list(COUNT_WORDS) + list(PLURALS.values())
# the phrase_kind field of the synthetic datasets
KINDS = ("attribute", "relational", "several", "none")

LOOKALIKE_FRACTION = 0.35
REDUNDANT_ATTRIBUTE_PROB = 0.25
# Minimum gap between two objects' boxes, in pixels.
OBJECT_GAP_PX = 2
# An object cut by the border (border_fraction) reaches past it by at most this share of its side.
BORDER_CUT = 0.4
# Shapes are drawn this many times larger and box-filtered down, for anti-aliased edges
# whose coverage matches the box exactly.
SUPERSAMPLE = 4


def _center(box: Sequence[float]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def _sample_attributes(rng: np.random.Generator, num_objects: int, lookalike: bool,
                       shape: Optional[str] = None) -> list[tuple[str, str, str]]:
    """(size, colour, shape) per object: all distinct, except one identical pair if ``lookalike``;
    all of ``shape`` where one is given (a scene of same-category distractors).

    Controlling duplicates here (instead of letting them happen by chance) fixes the
    share of look-alike scenes and keeps every object describable: a pair can
    always be told apart by position, a triple not always.
    """
    combos = list(itertools.product(SIZES, COLORS, [shape] if shape else SHAPES))
    num_distinct = num_objects - 1 if lookalike else num_objects
    picks = [combos[i] for i in rng.choice(len(combos), size=num_distinct, replace=False)]
    if lookalike:
        picks.append(picks[0])
    return picks


def _place_boxes(rng: np.random.Generator, sides: Sequence[int], image_size: int,
                 border_fraction: float = 0.0) -> Optional[list[tuple[int, int, int, int]]]:
    """Non-overlapping pixel boxes (x0, y0, x1, y1) of the given sides, or None if they did not fit.
    With ``border_fraction``, each object with that probability may reach past the image's border
    by up to ``BORDER_CUT`` of its side (the border cuts it, as photos cut objects)."""
    # Largest first: they are the hardest to fit.
    order = sorted(range(len(sides)), key=lambda i: -sides[i])
    placed: dict[int, tuple[int, int, int, int]] = {}
    for i in order:
        side = sides[i]
        cut = int(BORDER_CUT * side) if border_fraction > 0 and rng.random() < border_fraction else 0
        for _ in range(200):
            x0 = int(rng.integers(-cut, image_size - side + cut + 1))
            y0 = int(rng.integers(-cut, image_size - side + cut + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(
                box[0] >= b[2] + OBJECT_GAP_PX
                or b[0] >= box[2] + OBJECT_GAP_PX
                or box[1] >= b[3] + OBJECT_GAP_PX
                or b[1] >= box[3] + OBJECT_GAP_PX
                for b in placed.values()
            ):
                placed[i] = box
                break
        else:
            return None
    return [placed[i] for i in range(len(sides))]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Sequence[int], color: tuple[int, int, int]) -> None:
    """Draw ``shape`` filling the supersampled pixel ``box`` (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    # PIL includes the end coordinate; the box is exclusive.
    xe, ye = x1 - 1, y1 - 1
    if shape == "circle":
        draw.ellipse((x0, y0, xe, ye), fill=color)
    elif shape == "square":
        draw.rectangle((x0, y0, xe, ye), fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + xe) / 2.0, y0), (xe, ye), (x0, ye)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def generate_scene(
    rng: np.random.Generator,
    image_size: int = 64,
    min_objects: int = 2,
    max_objects: int = 4,
    lookalike_fraction: float = LOOKALIKE_FRACTION,
    same_shape_fraction: float = 0.0,
    border_fraction: float = 0.0,
) -> tuple[Image.Image, list[dict]]:
    """Draw one scene of ``min_objects..max_objects`` shapes.

    Returns the RGB image and one dict per object: ``shape``, ``color``, ``size``
    (names from :data:`SHAPES`, :data:`COLORS`, :data:`SIZES`) and ``box_xyxy``
    (relative, in [0, 1], tight around the drawn shape, the part inside the image). With probability
    ``lookalike_fraction`` (and at least 2 objects) two objects are identical in
    size, colour and shape; otherwise no two objects share all three. Closer to RefCOCO: with
    probability ``same_shape_fraction`` every object of the scene has one shape (same-category
    distractors, as RefCOCO's referred objects have), and each object with probability
    ``border_fraction`` may be cut by the image's border. (At 0, neither draws a random number:
    the scenes of a seed stay what they were.)
    """
    if not 1 <= min_objects <= max_objects:
        raise InputError("need 1 <= min_objects <= max_objects")
    while True:
        num_objects = int(rng.integers(min_objects, max_objects + 1))
        lookalike = num_objects >= 2 and rng.random() < lookalike_fraction
        shape = None
        if same_shape_fraction > 0 and rng.random() < same_shape_fraction:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
        attributes = _sample_attributes(rng, num_objects, lookalike, shape)
        sides = [
            max(3, int(round(rng.uniform(*SIZES[size]) * image_size)))
            for size, _, _ in attributes
        ]
        boxes = _place_boxes(rng, sides, image_size, border_fraction)
        if boxes is not None:
            break
        # Crowded draws (many large objects) can fail to fit: draw a new scene.

    big = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    objects = []
    for (size, color, shape), box in zip(attributes, boxes):
        base = np.array(COLORS[color])
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        fill = tuple(int(v) for v in np.clip(base + jitter, 0, 255))
        _draw(draw, shape, [v * SUPERSAMPLE for v in box], fill)
        objects.append(
            dict(
                shape=shape,
                color=color,
                size=size,
                box_xyxy=clip_box_to_image([v / image_size for v in box]),  # the part inside the image
            )
        )
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return image, objects


def object_kinds(obj: dict) -> list[str]:
    """Every kind of object that ``obj`` is, as a phrase's attribute words name it ("object",
    "red object", "small circle", "small red circle", ...): the kinds an image holds."""
    kinds = []
    for count in range(len(ATTRIBUTES) + 1):
        for subset in itertools.combinations(ATTRIBUTES, count):
            kinds.append(_kind_words({k: obj[k] for k in subset}))
    return kinds


def referent_kind(phrase: str) -> Optional[str]:
    """The kind of object a one-object phrase names by its target's attribute words ("the red
    object on the left" -> "red object"; "the circle to the left of the blue square" -> "circle"):
    an image that holds no object of this kind cannot hold the phrase's referent."""
    relation = relation_of(phrase)
    words = set((phrase.split(relation)[0] if relation else phrase).split())
    attributes = {key: next((w for w in words if w in values), None)
                  for key, values in (("size", SIZES), ("color", COLORS), ("shape", SHAPES))}
    return _kind_words({k: v for k, v in attributes.items() if v is not None})


def _kind_words(attributes: dict[str, str]) -> str:
    words = [attributes[key] for key in ("size", "color") if key in attributes]
    return " ".join(words + [attributes.get("shape", NOUN_WITHOUT_SHAPE)])


def _matches(obj: dict, attributes: dict[str, str]) -> bool:
    return all(obj[key] == value for key, value in attributes.items())


def _spatial_winner(objects: list[dict], candidates: list[int], word: str) -> list[int]:
    """The candidates within :data:`SPATIAL_TOLERANCE` of the most ``word`` one."""
    axis, pick_min = _SPATIAL_AXIS[word]
    coords = {i: _center(objects[i]["box_xyxy"])[axis] for i in candidates}
    best = min(coords.values()) if pick_min else max(coords.values())
    return [i for i in candidates if abs(coords[i] - best) <= SPATIAL_TOLERANCE]


def relation_of(phrase: str) -> Optional[str]:
    """The relation of a relational phrase (a key of :data:`RELATIONS`), or None."""
    words = f" {' '.join(phrase.lower().split())} "
    return next((r for r in RELATIONS if f" {r} the " in words), None)


def _relation_gap(objects: list[dict], i: int, anchor: int, relation: str) -> float:
    axis, sign = RELATIONS[relation]
    return sign * (_center(objects[i]["box_xyxy"])[axis] - _center(objects[anchor]["box_xyxy"])[axis])


def resolve(objects: list[dict], phrase: str) -> list[int]:
    """Indices of the objects that ``phrase`` denotes (the checker of :func:`describe` and
    :func:`describe_relational`).

    Colour, shape and size words filter the objects; a spatial word then keeps
    the candidate that is furthest in that direction, plus any candidate within
    :data:`SPATIAL_TOLERANCE` of it (a near-tie is ambiguous, so all tied are
    returned). A relational phrase ("the circle to the left of the blue square") keeps the
    objects of the first description, other than the anchor, that stand beyond
    :data:`RELATION_TOLERANCE` from the one object of the second description. A phrase
    identifies its target iff the result is ``[target]``. Raises ``ValueError`` for words
    outside :data:`VOCABULARY` and :data:`RELATION_WORDS`.
    """
    words = phrase.lower().split()
    quantifier = next((w for w in words if w in ("all", "every") or w in COUNT_WORDS), None)
    if quantifier is not None:  # "all the red shapes", "the two squares": every match, or the count's
        singular = {plural: noun for noun, plural in PLURALS.items()}
        singular["objects"] = NOUN_WITHOUT_SHAPE
        rest = " ".join(singular.get(w, w) for w in words if w != quantifier and w not in ("all", "every"))
        found = resolve(objects, rest if rest.startswith("the ") else "the " + rest)
        return found if quantifier not in COUNT_WORDS or len(found) == COUNT_WORDS[quantifier] else []
    relation = relation_of(phrase)
    if relation is not None:
        head, tail = f" {' '.join(phrase.lower().split())} ".split(f" {relation} ", 1)
        anchors = resolve(objects, tail)
        if len(anchors) != 1:
            return []  # the anchor must be one object
        return [i for i in resolve(objects, head) if i != anchors[0]
                and _relation_gap(objects, i, anchors[0], relation) > RELATION_TOLERANCE]
    attributes: dict[str, str] = {}
    spatial: list[str] = []
    for word in words:
        if word not in VOCABULARY:
            raise ValueError(f"word {word!r} of {phrase!r} is not in VOCABULARY")
        for key, names in (("size", SIZES), ("color", COLORS), ("shape", SHAPES)):
            if word in names:
                if attributes.setdefault(key, word) != word:
                    return []  # e.g. "red blue": nothing is both
        if word in SPATIAL_PHRASES:
            spatial.append(word)
    candidates = [i for i, obj in enumerate(objects) if _matches(obj, attributes)]
    for word in spatial:
        if candidates:
            candidates = _spatial_winner(objects, candidates, word)
    return candidates


def _best_spatial_word(objects: list[dict], group: list[int], target: int) -> Optional[str]:
    """The spatial word under which ``target`` leads the rest of ``group`` by the widest margin."""
    best_word, best_gap = None, SPATIAL_TOLERANCE
    for word, (axis, pick_min) in _SPATIAL_AXIS.items():
        sign = 1.0 if pick_min else -1.0
        mine = sign * _center(objects[target]["box_xyxy"])[axis]
        gap = min(sign * _center(objects[i]["box_xyxy"])[axis] - mine for i in group if i != target)
        if gap > best_gap:
            best_word, best_gap = word, gap
    return best_word


def describe(objects: list[dict], target: int, rng: np.random.Generator) -> str:
    """A referring phrase that identifies ``objects[target]`` alone.

    The phrase names a smallest set of attributes (size, colour, shape) that
    separates the target from every object that is not its look-alike, chosen at
    random among the smallest sets, and with probability
    :data:`REDUNDANT_ATTRIBUTE_PROB` one more (redundant) attribute. If look-alikes
    remain, the spatial word under which the target is furthest ahead of them is
    appended. Raises ``ValueError`` if the target cannot be singled out (it is
    not ahead of its look-alikes in any direction).
    """
    me = objects[target]
    group = [i for i, obj in enumerate(objects) if all(obj[k] == me[k] for k in ATTRIBUTES)]
    spatial = None
    if len(group) > 1:
        spatial = _best_spatial_word(objects, group, target)
        if spatial is None:
            raise ValueError(f"object {target} cannot be told apart from its look-alikes {group}")

    for count in range(len(ATTRIBUTES) + 1):
        # The subsets that select exactly the look-alike group (the target alone if it has none).
        subsets = [
            subset
            for subset in itertools.combinations(ATTRIBUTES, count)
            if [i for i, obj in enumerate(objects) if _matches(obj, {k: me[k] for k in subset})] == group
        ]
        if subsets:
            break
    chosen = set(subsets[int(rng.integers(len(subsets)))])
    unused = [key for key in ATTRIBUTES if key not in chosen]
    # At least one attribute, or the phrase would be "the object": it is then redundant but natural.
    if unused and (not chosen or rng.random() < REDUNDANT_ATTRIBUTE_PROB):
        chosen.add(unused[int(rng.integers(len(unused)))])

    words = ["the"]
    words += [me[key] for key in ("size", "color") if key in chosen]
    words.append(me["shape"] if "shape" in chosen else NOUN_WITHOUT_SHAPE)
    if spatial is not None:
        words.append(SPATIAL_PHRASES[spatial])
    return " ".join(words)


def _words(obj: dict, keys) -> list[str]:
    """"the [size] [colour] shape|object" of ``obj`` naming only ``keys``."""
    words = ["the"] + [obj[k] for k in ("size", "color") if k in keys]
    return words + [obj["shape"] if "shape" in keys else NOUN_WITHOUT_SHAPE]


def _attribute_subsets() -> list[tuple[str, ...]]:
    return [subset for count in range(len(ATTRIBUTES) + 1) for subset in itertools.combinations(ATTRIBUTES, count)]


def describe_relational(objects: list[dict], target: int, rng: np.random.Generator) -> Optional[str]:
    """A relational phrase that identifies ``objects[target]`` alone, or None where the scene
    has none: the target's description matches at least one other object (so the relation is
    needed), an anchor that its own attributes single out, and a relation that the target
    passes and every other object of its description clearly fails."""
    found = []
    for anchor in range(len(objects)):
        if anchor == target:
            continue
        me = objects[anchor]
        anchor_keys = [keys for keys in _attribute_subsets() if keys and
                       [i for i, o in enumerate(objects) if _matches(o, {k: me[k] for k in keys})] == [anchor]]
        if not anchor_keys:
            continue  # a look-alike: no description of its own
        shortest = min(len(k) for k in anchor_keys)
        anchor_keys = [k for k in anchor_keys if len(k) == shortest]
        for relation in RELATIONS:
            if _relation_gap(objects, target, anchor, relation) <= RELATION_TOLERANCE + RELATION_MARGIN:
                continue
            for keys in _attribute_subsets():
                wanted = {k: objects[target][k] for k in keys}
                group = [i for i, o in enumerate(objects) if i != anchor and _matches(o, wanted)]
                if len(group) >= 2 and all(_relation_gap(objects, i, anchor, relation)
                                           < RELATION_TOLERANCE - RELATION_MARGIN for i in group if i != target):
                    found.append((keys, relation, anchor, anchor_keys))
    if not found:
        return None
    keys, relation, anchor, anchor_keys = found[int(rng.integers(len(found)))]
    words = _words(objects[target], keys) + relation.split()
    return " ".join(words + _words(objects[anchor], anchor_keys[int(rng.integers(len(anchor_keys)))]))


def describe_several(objects: list[dict], rng: np.random.Generator) -> Optional[tuple[list[int], str]]:
    """A phrase of several objects and the objects it denotes (all of them), or None where no
    description (at most two attributes, no spatial word) matches two objects or more."""
    found = []
    for keys in _attribute_subsets():
        if not keys or len(keys) == len(ATTRIBUTES):
            continue
        for combo in sorted({tuple(o[k] for k in keys) for o in objects}):
            wanted = dict(zip(keys, combo))
            group = [i for i, o in enumerate(objects) if _matches(o, wanted)]
            if len(group) >= 2:
                found.append((wanted, group))
    if not found:
        return None
    wanted, group = found[int(rng.integers(len(found)))]
    adjectives = [wanted[k] for k in ("size", "color") if k in wanted]
    noun = wanted.get("shape", NOUN_WITHOUT_SHAPE)
    forms = [["all", "the"] + adjectives + [PLURALS[noun]], ["every"] + adjectives + [noun]]
    forms += [["the", w] + adjectives + [PLURALS[noun]] for w, n in COUNT_WORDS.items() if n == len(group) and w != "both"]
    forms += [["both"] + adjectives + [PLURALS[noun]]] if len(group) == 2 else []
    return group, " ".join(forms[int(rng.integers(len(forms)))])


def describe_absent(objects: list[dict], rng: np.random.Generator) -> Optional[str]:
    """A phrase of no object in this image, made to deceive: a colour and shape (and sometimes
    a size) that no object has together, though some object has the colour or the shape."""
    present = {(o["color"], o["shape"]) for o in objects}
    colors, shapes = {o["color"] for o in objects}, {o["shape"] for o in objects}
    pairs = [(c, sh) for c in COLORS for sh in SHAPES if (c, sh) not in present and (c in colors or sh in shapes)]
    if not pairs:
        return None
    color, shape = pairs[int(rng.integers(len(pairs)))]
    size = [list(SIZES)[int(rng.integers(len(SIZES)))]] if rng.random() < REDUNDANT_ATTRIBUTE_PROB else []
    return " ".join(["the"] + size + [color, shape])


def generate_grec_example(
    rng: np.random.Generator,
    several_fraction: float = 0.0,
    none_fraction: float = 0.0,
    **scene,
) -> tuple[Image.Image, list[dict], list[tuple[list[int], str, str]]]:
    """:func:`generate_example`, with phrases that denote several objects or none: each phrase
    becomes one of no object with probability ``none_fraction`` and, otherwise, one of several
    with probability ``several_fraction`` where the scene allows. Returns (targets, phrase,
    kind) triples, ``kind`` one of :data:`KINDS`. ``scene``: :func:`generate_example`'s settings;
    with both fractions at 0 it draws exactly what :func:`generate_example` draws."""
    image, objects, expressions = generate_example(rng, **scene)
    out = []
    for target, phrase in expressions:
        single = ([target], phrase, "relational" if relation_of(phrase) else "attribute")
        item = single
        if none_fraction > 0 and rng.random() < none_fraction:
            absent = describe_absent(objects, rng)
            item = ([], absent, "none") if absent else single
        elif several_fraction > 0 and rng.random() < several_fraction:
            several = describe_several(objects, rng)
            item = (several[0], several[1], "several") if several else single
        out.append(single if any(item[1] == phrase for _, phrase, _ in out) else item)  # one phrase once
    return image, objects, out


def generate_example(
    rng: np.random.Generator,
    image_size: int = 64,
    expressions_per_image: int = 2,
    min_objects: int = 2,
    max_objects: int = 4,
    lookalike_fraction: float = LOOKALIKE_FRACTION,
    relational_fraction: float = 0.0,
    same_shape_fraction: float = 0.0,
    border_fraction: float = 0.0,
) -> tuple[Image.Image, list[dict], list[tuple[int, str]]]:
    """One scene and up to ``expressions_per_image`` (target index, phrase) pairs, distinct targets.

    In a look-alike scene one target is always a look-alike, so that scenes which
    need a spatial word also yield phrases that use one. With ``relational_fraction`` a
    phrase is relational with that probability where the scene allows one.
    """
    image, objects = generate_scene(rng, image_size, min_objects, max_objects, lookalike_fraction, same_shape_fraction,
                                    border_fraction)
    order = [int(i) for i in rng.permutation(len(objects))]
    keys = [tuple(obj[k] for k in ATTRIBUTES) for obj in objects]
    twins = [i for i in order if keys.count(keys[i]) > 1]
    if twins:
        order.remove(twins[0])
        order.insert(0, twins[0])
    targets = order[: min(expressions_per_image, len(objects))]
    expressions = []
    for t in targets:
        phrase = None
        if relational_fraction > 0 and rng.random() < relational_fraction:  # (no draw at 0: the same stream)
            phrase = describe_relational(objects, t, rng)
        expressions.append((t, phrase or describe(objects, t, rng)))
    return image, objects, expressions


def image_rng(seed: int, image_id: int) -> np.random.Generator:
    """The random stream of image ``image_id``: an image depends on the seed and its id only.

    The middle word tags the stream (1: images, 0: the split shuffle). Seed sequences
    ignore trailing zeros, so untagged, image 0's ``[seed, 0]`` would equal ``[seed]``.
    """
    return np.random.default_rng([seed, 1, image_id])


def _split_counts(num_images: int, split_fractions: Sequence[tuple[str, float]]) -> list[int]:
    """Images per split: largest-remainder rounding, at least one per split when there are enough images."""
    fractions = np.array([float(f) for _, f in split_fractions])
    if (fractions < 0).any() or fractions.sum() <= 0:
        raise InputError(f"bad split_fractions {split_fractions!r}: give (split name, fraction >= 0) pairs")
    exact = fractions / fractions.sum() * num_images
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_images - counts.sum()]:
        counts[i] += 1
    # Tiny datasets would otherwise leave val/test empty.
    for i in np.flatnonzero((counts == 0) & (fractions > 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    return counts.tolist()


@dataclass(frozen=True)
class SyntheticSpec:
    """What a synthetic dataset holds: the same spec (seed included) gives the same phrases,
    boxes and pixels. The fields are :func:`generate_grec_example`'s (see it and
    :func:`generate_scene`), plus how many images, their splits (by image; ``(split name,
    fraction)`` pairs), the seed and the label of every box."""

    num_images: int = 2000
    image_size: int = 64
    expressions_per_image: int = 2
    split_fractions: Sequence[tuple[str, float]] = (("train", 0.8), ("val", 0.1), ("test", 0.1))
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 4
    lookalike_fraction: float = LOOKALIKE_FRACTION
    label: str = DEFAULT_LABEL
    relational_fraction: float = 0.0
    several_fraction: float = 0.0
    none_fraction: float = 0.0
    same_shape_fraction: float = 0.0
    border_fraction: float = 0.0

    def __post_init__(self):
        if not isinstance(self.num_images, int) or self.num_images < 1:
            raise InputError(f"num_images must be an integer >= 1, got {self.num_images!r}")

    @property
    def grec(self) -> bool:
        """Whether phrases may denote several objects or none (gRefCOCO's fields on every sample)."""
        return self.several_fraction > 0 or self.none_fraction > 0

    def example(self, image_id: int) -> tuple[Image.Image, list[dict], list[tuple[list[int], str, str]]]:
        """Image ``image_id``'s scene, objects and (targets, phrase, kind) triples: it depends on
        ``(seed, image_id)`` only."""
        return generate_grec_example(
            image_rng(self.seed, image_id), self.several_fraction, self.none_fraction, image_size=self.image_size,
            expressions_per_image=self.expressions_per_image, min_objects=self.min_objects,
            max_objects=self.max_objects, lookalike_fraction=self.lookalike_fraction,
            relational_fraction=self.relational_fraction, same_shape_fraction=self.same_shape_fraction,
            border_fraction=self.border_fraction)

    def image_splits(self) -> list[str]:
        """The split of each image, shuffled so that splits do not follow generation order (a
        separate stream from the scenes')."""
        counts = _split_counts(self.num_images, self.split_fractions)
        splits = np.repeat([split for split, _ in self.split_fractions], counts)
        return [str(s) for s in splits[np.random.default_rng([self.seed, 0]).permutation(self.num_images)]]

    def info(self, out_dir: str) -> dict:
        """What ``dataset.info["synthetic"]`` records."""
        return dict(
            num_images=self.num_images,
            image_size=self.image_size,
            expressions_per_image=self.expressions_per_image,
            split_fractions=[[split, float(f)] for split, f in self.split_fractions],
            seed=self.seed,
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            lookalike_fraction=self.lookalike_fraction,
            relational_fraction=self.relational_fraction,
            several_fraction=self.several_fraction,
            none_fraction=self.none_fraction,
            same_shape_fraction=self.same_shape_fraction,
            border_fraction=self.border_fraction,
            out_dir=out_dir,
            vocabulary=VOCABULARY,
        )


def make_synthetic_dataset(
    name: str = "grounding-synthetic",
    spec: Optional[SyntheticSpec] = None,
    *,
    out_dir: Optional[str] = None,
    overwrite: bool = False,
    persistent: bool = True,
    progress: bool = True,
    **fields,
) -> fo.Dataset:
    """Generate the synthetic referring dataset into FiftyOne (or load it if it exists).

    What it holds is ``spec`` (a :class:`SyntheticSpec`), or the spec of the ``fields`` given
    by name (``num_images=200, seed=3``; with ``spec`` too, they replace its fields).

    One sample per referring expression, with fields ``expression``, ``ground_truth`` (one
    box labelled ``label``, the phrase as its ``expression`` attribute), ``split`` (also a
    sample tag), ``image_id``, ``ref_id`` (one per referred object), ``ann_id`` (one per drawn
    object), ``sent_id`` (one per expression), ``category`` (the target's shape), ``referent_kind``
    (the kind of object the phrase names: its target's attribute words, "red object") and
    ``image_kinds`` (every kind an object of the image is; training shows a phrase with an image
    that holds no object of its kind: see ``data.absent.add_absent_pairs``),
    ``phrase_kind`` ("attribute", or "relational": see :func:`describe_relational`; a share
    ``relational_fraction`` of the phrases where the scene allows) and ``metadata``. Images
    are PNGs under ``out_dir`` (default ``<fo.config.default_dataset_dir>/<name>``); splits
    are by image.

    Closer to RefCOCO (:func:`generate_scene`): ``same_shape_fraction`` of the scenes hold one shape
    only (same-category distractors), ``border_fraction`` of the objects may be cut by the border;
    with ``min_objects``/``max_objects`` 3-6, about RefCOCO's crowding.

    With ``several_fraction`` or ``none_fraction`` (generalized grounding, as gRefCOCO; see
    :func:`generate_grec_example`) some phrases denote several objects or none: their
    ``ground_truth`` holds that many boxes, and every sample gets gRefCOCO's fields
    ``no_target``, ``ann_ids`` and ``categories`` (``phrase_kind`` "several" or "none").

    Image ``i`` depends only on ``(seed, i)``, so the same seed gives the same
    phrases, boxes and pixels. An existing dataset ``name`` is returned unchanged
    unless ``overwrite=True``, which deletes and regenerates it, or unless its image files
    are gone, which regenerates it too.
    """
    spec = dataclasses.replace(spec, **fields) if spec is not None else SyntheticSpec(**fields)
    existing = _reusable(name, overwrite)
    if existing is not None:
        return existing
    if out_dir is None:
        out_dir = os.path.join(fo.config.default_dataset_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    image_splits = spec.image_splits()
    samples = []
    first_ann_id = 0  # object ids are dataset-wide: an image's first object gets the next free id
    for image_id in bar(range(spec.num_images), desc="synthetic images", disable=not progress):
        image_samples, num_objects = _image_samples(spec, image_id, image_splits[image_id], out_dir, first_ann_id,
                                                    len(samples))
        samples += image_samples
        first_ann_id += num_objects
    return _write_dataset(name, samples, spec, out_dir, persistent, progress)


def _reusable(name: str, overwrite: bool) -> Optional[fo.Dataset]:
    """The existing dataset ``name`` where it may be returned as it is; otherwise None, with any
    dataset of that name deleted (``overwrite``, or its images are gone)."""
    if not fo.dataset_exists(name):
        return None
    if not overwrite:
        existing = fo.load_dataset(name)
        missing = next((f for f in existing.values("filepath") if not os.path.exists(f)), None)
        if missing is None:
            return existing
        # e.g. made in a clone that was deleted since: unusable, so it is made again
        print(f"Regenerating the dataset {name!r}: its images are gone (e.g. {missing})")
    fo.delete_dataset(name)
    return None


def _image_samples(spec: SyntheticSpec, image_id: int, split: str, out_dir: str, first_ann_id: int,
                   first_ref_id: int) -> tuple[list[fo.Sample], int]:
    """Draw image ``image_id``, save its PNG and return one sample per expression, and how many
    objects the image holds. One sentence per referred object (or set) here, so sentence and
    ref ids coincide: the expressions' ids count on from ``first_ref_id``."""
    image, objects, expressions = spec.example(image_id)
    filepath = os.path.join(out_dir, f"{image_id:06d}.png")
    image.save(filepath)
    metadata = fo.ImageMetadata(
        width=spec.image_size,
        height=spec.image_size,
        num_channels=3,
        mime_type="image/png",
        size_bytes=os.path.getsize(filepath),
    )
    kinds = sorted({k for obj in objects for k in object_kinds(obj)})
    samples = []
    for ref_id, (targets, phrase, kind) in enumerate(expressions, start=first_ref_id):
        boxes = [objects[t]["box_xyxy"] for t in targets]
        samples.append(
            fo.Sample(
                filepath=filepath,
                tags=[split],
                metadata=metadata,
                expression=phrase,
                ground_truth=(make_detections(boxes[0], phrase, label=spec.label) if len(boxes) == 1
                              else make_box_detections(boxes, phrase, label=spec.label)),
                split=split,
                image_id=image_id,
                ref_id=ref_id,
                sent_id=ref_id,
                phrase_kind=kind,
                **_target_fields(objects, targets, phrase, first_ann_id, kinds, spec.grec),
            )
        )
    return samples, len(objects)


def _target_fields(objects: list[dict], targets: list[int], phrase: str, first_ann_id: int, kinds: list[str],
                   grec: bool) -> dict:
    """The sample fields of a phrase's targets: ``ann_id``, ``category``, its referent's kind and the
    image's kinds; with ``grec`` also gRefCOCO's ``ann_ids``, ``categories`` and ``no_target``."""
    shapes = sorted({objects[t]["shape"] for t in targets})
    fields = dict(ann_id=first_ann_id + targets[0] if len(targets) == 1 else None,
                  category=shapes[0] if len(shapes) == 1 else None,
                  **{REFERENT_KIND_FIELD: referent_kind(phrase) if len(targets) == 1 else None,
                     IMAGE_KINDS_FIELD: kinds})
    if grec:
        fields.update(ann_ids=[first_ann_id + t for t in targets],
                      categories=[objects[t]["shape"] for t in targets],
                      **{NO_TARGET_FIELD: not targets})
    return fields


def _write_dataset(name: str, samples: list, spec: SyntheticSpec, out_dir: str, persistent: bool,
                   progress: bool) -> fo.Dataset:
    """The FiftyOne dataset ``name`` of ``samples``, with the spec recorded in its info."""
    dataset = fo.Dataset(name)
    with fiftyone_progress(progress, "adding the samples") as shown:
        dataset.add_samples(samples, progress=shown)
    declare_expression_attribute(dataset, "ground_truth")
    dataset.persistent = persistent
    dataset.info["synthetic"] = spec.info(out_dir)
    dataset.save()
    return dataset
