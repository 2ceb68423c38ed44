"""The synthetic referring dataset: phrases, drawing, and its FiftyOne form."""

import itertools
import os

import numpy as np
import pytest
from PIL import Image

import fiftyone as fo

from fiftyone_grounding.data import synthetic as syn
from fiftyone_grounding.models.boxes import is_valid_xyxy
from fiftyone_grounding.data.labels import detection_xyxy, expression_text
from fiftyone_grounding.errors import InputError

KINDS = {
    "color": set(syn.COLORS),
    "shape": set(syn.SHAPES),
    "size": set(syn.SIZES),
    "spatial": set(syn.SPATIAL_PHRASES),
}


def _examples(n, seed=0, **kwargs):
    for image_id in range(n):
        yield syn.generate_example(syn.image_rng(seed, image_id), **kwargs)


@pytest.fixture(scope="module")
def examples():
    """600 generated images with their objects and phrases, shared by the tests that read them."""
    return list(_examples(600))


@pytest.fixture(scope="module")
def scenes():
    """400 generated scenes (image, objects), shared by the tests that read them."""
    return [syn.generate_scene(np.random.default_rng(i)) for i in range(400)]


def _pixels(image):
    return np.asarray(image, dtype=int)


def _obj(shape, color, size, box):
    return dict(shape=shape, color=color, size=size, box_xyxy=list(box))


# ---------------------------------------------------------------- phrases


def test_every_phrase_resolves_to_its_target_alone(examples):
    count = 0
    for _, objects, expressions in examples:
        assert len({t for t, _ in expressions}) == len(expressions)  # distinct targets
        for target, phrase in expressions:
            assert syn.resolve(objects, phrase) == [target], (objects, phrase)
            count += 1
    assert count >= 1000


def test_every_object_is_describable(scenes):
    for i, (_, objects) in enumerate(scenes):
        for target in range(len(objects)):
            phrase = syn.describe(objects, target, np.random.default_rng(i))
            assert syn.resolve(objects, phrase) == [target]


def test_vocabulary_covers_every_word_and_grammar_is_fixed(examples):
    used = set()
    for _, _, expressions in examples:
        for _, phrase in expressions:
            words = phrase.split()
            used.update(words)
            assert words[0] == "the"
            assert (syn.NOUN_WITHOUT_SHAPE in words) != any(w in syn.SHAPES for w in words)
    assert used <= set(syn.VOCABULARY)
    assert len(syn.VOCABULARY) == len(set(syn.VOCABULARY))
    # Every vocabulary word is actually produced.
    assert used == set(syn.VOCABULARY)


def test_the_tiny_tokenizer_keeps_every_synthetic_word_whole(examples):
    """The tiny text encoder's vocabulary (``encoders.TINY_WORDS``) must hold the generator's
    words, or phrases are spelled out in characters."""
    from fiftyone_grounding.models.encoders import load_tokenizer

    tokenizer = load_tokenizer("tiny:bert")
    for _, _, expressions in examples[:200]:
        for _, phrase in expressions:
            assert tokenizer.tokenize(phrase) == phrase.split(), phrase


def test_each_attribute_kind_is_common(examples):
    phrases = [p for _, _, ex in examples for _, p in ex]
    for kind, words in KINDS.items():
        share = np.mean([bool(words & set(p.split())) for p in phrases])
        assert share >= 0.15, (kind, share)
    for word in syn.SPATIAL_PHRASES:
        assert any(word in p.split() for p in phrases)


def test_lookalikes_need_a_spatial_word_on_their_best_separated_axis():
    objects = [
        _obj("circle", "red", "small", (0.10, 0.40, 0.25, 0.55)),
        _obj("circle", "red", "small", (0.70, 0.45, 0.85, 0.60)),
        _obj("square", "blue", "large", (0.35, 0.00, 0.65, 0.30)),
    ]
    rng = np.random.default_rng(0)
    left = syn.describe(objects, 0, rng)
    right = syn.describe(objects, 1, rng)
    assert left.endswith("on the left") and right.endswith("on the right")
    assert syn.resolve(objects, left) == [0] and syn.resolve(objects, right) == [1]
    # Without the spatial word the phrase is ambiguous; a horizontal flip swaps the words.
    assert syn.resolve(objects, "the red circle") == [0, 1]
    assert syn.resolve(objects, "the small red object at the top") == [0, 1]  # a near-tie vertically
    assert syn.describe(objects, 2, rng) in {
        "the blue object", "the large object", "the square",
        "the large blue object", "the blue square", "the large square",
    }


def test_resolve_rejects_unknown_words_and_conflicts():
    objects = [_obj("circle", "red", "small", (0, 0, 0.1, 0.1))]
    with pytest.raises(ValueError):
        syn.resolve(objects, "the purple circle")
    assert syn.resolve(objects, "the red blue circle") == []


def test_describe_refuses_an_indistinguishable_target():
    # Three look-alikes on a diagonal line: the middle one is extreme in no direction.
    objects = [_obj("square", "green", "small", (0.1 + d, 0.1 + d, 0.2 + d, 0.2 + d)) for d in (0.0, 0.3, 0.6)]
    with pytest.raises(ValueError):
        syn.describe(objects, 1, np.random.default_rng(0))


# ---------------------------------------------------------------- drawing


def test_scenes_are_valid_and_boxes_match_the_pixels(scenes):
    background = np.array(syn.BACKGROUND)
    for image, objects in scenes[:150]:
        assert image.size == (64, 64) and image.mode == "RGB"
        assert 2 <= len(objects) <= 4
        pix = _pixels(image)
        drawn = np.abs(pix - background).sum(-1) > 0
        covered = np.zeros_like(drawn)
        for obj in objects:
            box = obj["box_xyxy"]
            assert is_valid_xyxy(box) and all(0.0 <= v <= 1.0 for v in box)
            side = box[2] - box[0]
            lo, hi = syn.SIZES[obj["size"]]
            assert lo - 1 / 64 <= side <= hi + 1 / 64
            x0, y0, x1, y1 = (int(round(v * 64)) for v in box)
            covered[y0:y1, x0:x1] = True
            # The target's colour is at the centre of its box.
            centre = pix[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(centre - np.array(syn.COLORS[obj["color"]])).max() <= syn.COLOR_JITTER + 2
            # The box is tight: something is drawn on each of its four edges.
            inside = drawn[y0:y1, x0:x1]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # Nothing is drawn outside the boxes.
        assert not (drawn & ~covered).any()
        for a, b in itertools.combinations(objects, 2):
            ax0, ay0, ax1, ay1 = a["box_xyxy"]
            bx0, by0, bx1, by1 = b["box_xyxy"]
            assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0  # no overlap, with a gap


def test_lookalike_share_is_controlled(scenes):
    share = np.mean(
        [len({(o["size"], o["color"], o["shape"]) for o in objs}) < len(objs) for _, objs in scenes]
    )
    assert 0.25 <= share <= 0.45


def test_generation_is_deterministic_per_seed():
    a = list(_examples(20, seed=3))
    b = list(_examples(20, seed=3))
    c = list(_examples(20, seed=4))
    for (ia, oa, ea), (ib, ob, eb) in zip(a, b):
        assert np.array_equal(_pixels(ia), _pixels(ib)) and oa == ob and ea == eb
    assert [e for _, _, e in a] != [e for _, _, e in c]


# ---------------------------------------------------------------- FiftyOne


def _make(name, out_dir, **kwargs):
    kwargs = dict(num_images=30, out_dir=str(out_dir), seed=7, persistent=False, progress=False, **kwargs)
    return syn.make_synthetic_dataset(name, **kwargs)


def test_dataset_fields_splits_and_regeneration(dataset_name, tmp_path):
    ds = _make(dataset_name, tmp_path)
    assert len(ds) == 60  # 2 expressions per image, every scene has >= 2 objects
    assert not ds.persistent
    assert ds.info["synthetic"]["seed"] == 7 and ds.info["synthetic"]["vocabulary"] == syn.VOCABULARY

    rows = zip(*ds.values(
        ["filepath", "expression", "ground_truth", "split", "tags", "image_id", "ref_id",
         "ann_id", "sent_id", "category", "metadata"]
    ))
    split_of_image, files_of_image = {}, {}
    ref_ids, ann_ids, sent_ids = [], [], []
    for filepath, expression, gt, split, tags, image_id, ref_id, ann_id, sent_id, category, meta in rows:
        assert os.path.dirname(filepath) == str(tmp_path) and filepath.endswith(".png")
        assert tags == [split]
        assert split_of_image.setdefault(image_id, split) == split  # splits are by image
        assert files_of_image.setdefault(image_id, filepath) == filepath
        assert isinstance(meta, fo.ImageMetadata) and (meta.width, meta.height) == (64, 64)
        assert len(gt.detections) == 1 and gt.detections[0].label == "referent"
        assert gt.detections[0].expression == expression_text(expression)
        ref_ids.append(ref_id), ann_ids.append(ann_id), sent_ids.append(sent_id)

        # Regenerate the image's scene: same pixels, and the phrase denotes the stored box alone.
        image, objects, expressions = syn.generate_example(syn.image_rng(7, image_id))
        assert np.array_equal(_pixels(Image.open(filepath).convert("RGB")), _pixels(image))
        assert expression in [p for _, p in expressions]
        (target,) = syn.resolve(objects, expression)
        assert np.allclose(detection_xyxy(gt.detections[0].bounding_box), objects[target]["box_xyxy"])
        assert category == objects[target]["shape"]

    assert len(set(ref_ids)) == len(set(sent_ids)) == len(set(ann_ids)) == len(ds)
    assert sorted(split_of_image) == list(range(30))
    assert sorted(set(split_of_image.values())) == ["test", "train", "val"]
    assert ds.count_values("split") == {
        s: 2 * list(split_of_image.values()).count(s) for s in ("train", "val", "test")
    }


def test_dataset_is_deterministic(dataset_name, tmp_path):
    other = dataset_name + "-b"
    try:
        a = _make(dataset_name, tmp_path / "a")
        b = _make(other, tmp_path / "b")
        fields = ["expression", "split", "image_id", "ref_id", "ann_id", "category", "ground_truth.detections.bounding_box"]
        for field in fields:
            assert a.values(field) == b.values(field), field
        for fa, fb in zip(a.values("filepath"), b.values("filepath")):
            assert np.array_equal(_pixels(Image.open(fa)), _pixels(Image.open(fb)))
    finally:
        if fo.dataset_exists(other):
            fo.delete_dataset(other)


def test_a_spec_makes_what_its_fields_by_name_make(dataset_name, tmp_path):
    spec = syn.SyntheticSpec(num_images=6, seed=5, several_fraction=0.5)
    by_name = syn.make_synthetic_dataset(dataset_name, num_images=6, seed=5, several_fraction=0.5,
                                         out_dir=str(tmp_path / "a"), persistent=False, progress=False)
    fields = ["expression", "split", "ann_ids", "ground_truth.detections.bounding_box"]
    other = dataset_name + "-spec"
    try:
        by_spec = syn.make_synthetic_dataset(other, spec, out_dir=str(tmp_path / "b"), persistent=False,
                                             progress=False)
        assert by_spec.values(fields) == by_name.values(fields)
        assert {**by_spec.info["synthetic"], "out_dir": None} == {**by_name.info["synthetic"], "out_dir": None}
        # fields by name replace the spec's
        again = syn.make_synthetic_dataset(other, spec, seed=6, overwrite=True, out_dir=str(tmp_path / "c"),
                                           persistent=False, progress=False)
        assert again.info["synthetic"]["seed"] == 6 and again.values(fields) != by_name.values(fields)
    finally:
        if fo.dataset_exists(other):
            fo.delete_dataset(other)
    with pytest.raises(InputError, match="num_images must be an integer >= 1"):
        syn.SyntheticSpec(num_images=0)


def test_overwrite_semantics(dataset_name, tmp_path):
    ds = _make(dataset_name, tmp_path, expressions_per_image=1)
    assert len(ds) == 30
    ds.delete_samples(ds.limit(5))
    # Exists and no overwrite: returned unchanged, even with other arguments.
    again = _make(dataset_name, tmp_path, expressions_per_image=2)
    assert len(again) == 25 and again.info["synthetic"]["expressions_per_image"] == 1
    # Overwrite: deleted and regenerated.
    fresh = _make(dataset_name, tmp_path, expressions_per_image=2, overwrite=True)
    assert len(fresh) == 60 and fresh.info["synthetic"]["expressions_per_image"] == 2


def test_a_dataset_whose_images_are_gone_is_made_again(dataset_name, tmp_path, capsys):
    ds = _make(dataset_name, tmp_path / "old")
    path = ds.first().filepath
    os.remove(path)  # e.g. the clone that held the images was deleted
    again = _make(dataset_name, tmp_path / "new")
    assert len(again) == 60 and all(os.path.exists(f) for f in again.values("filepath"))
    assert f"its images are gone (e.g. {path})" in capsys.readouterr().out


def test_default_out_dir_and_small_splits(dataset_name, tmp_path, monkeypatch):
    monkeypatch.setattr(fo.config, "default_dataset_dir", str(tmp_path))
    ds = syn.make_synthetic_dataset(dataset_name, num_images=4, persistent=False, progress=False)
    assert all(os.path.dirname(f) == os.path.join(str(tmp_path), dataset_name) for f in ds.values("filepath"))
    # Even 4 images put at least one image in every split.
    assert set(ds.distinct("split")) == {"train", "val", "test"}


# ---------------------------------------------------------------- relational phrases


@pytest.fixture(scope="module")
def relational_examples():
    return list(_examples(300, seed=2, min_objects=3, max_objects=5, relational_fraction=0.7))


def test_relational_phrases_need_the_relation_and_name_their_target_alone(relational_examples):
    count = 0
    for _, objects, expressions in relational_examples:
        for target, phrase in expressions:
            assert syn.resolve(objects, phrase) == [target], (objects, phrase)
            relation = syn.relation_of(phrase)
            if relation is None:
                continue
            count += 1
            head, tail = phrase.split(f" {relation} ")
            anchor = syn.resolve(objects, tail)
            assert len(anchor) == 1 and anchor[0] != target  # the anchor: one other object
            # without the relation the target is not alone: the image must be read with the phrase
            assert len([i for i in syn.resolve(objects, head) if i != anchor[0]]) >= 2
    assert count >= 200


def test_relational_words_are_the_tiny_tokenizers(relational_examples):
    from fiftyone_grounding.models.encoders import load_tokenizer

    tokenizer = load_tokenizer("tiny:bert")
    used = set()
    for _, _, expressions in relational_examples:
        for _, phrase in expressions:
            used.update(phrase.split())
            assert tokenizer.tokenize(phrase) == phrase.split(), phrase
    assert set(syn.RELATION_WORDS) <= used <= set(syn.VOCABULARY) | set(syn.RELATION_WORDS)


# the first images of seed 0 as the generator drew them before relational phrases existed
# (the offline demo's data): the same targets, phrases and box positions
STREAM_BEFORE_RELATIONS = [
    ([(2, "the large circle"), (0, "the white object")], [0.015625, 0.84375, 0.171875]),
    ([(0, "the triangle on the left"), (1, "the small object")], [0.140625, 0.46875, 0.171875, 0.703125]),
    ([(2, "the yellow object on the left"), (1, "the red object")], [0.625, 0.203125, 0.078125]),
    ([(0, "the circle"), (1, "the square")], [0.453125, 0.015625]),
    ([(0, "the square"), (1, "the circle")], [0.53125, 0.390625]),
    ([(3, "the green object at the top"), (1, "the white object")], [0.5625, 0.171875, 0.734375, 0.640625]),
]


def test_without_relational_phrases_the_stream_is_the_one_before():
    """relational_fraction=0 (the default) draws nothing more: the demo's images and phrases."""
    for image_id, (expressions, left_edges) in enumerate(STREAM_BEFORE_RELATIONS):
        _, objects, got = syn.generate_example(syn.image_rng(0, image_id))
        assert got == expressions and [o["box_xyxy"][0] for o in objects] == left_edges


def test_the_dataset_records_each_phrases_kind(dataset_name, tmp_path):
    ds = _make(dataset_name, tmp_path, min_objects=3, max_objects=5, relational_fraction=0.8)
    kinds = dict(zip(ds.values("expression"), ds.values("phrase_kind")))
    assert set(kinds.values()) == {"attribute", "relational"}
    assert all((syn.relation_of(p) is not None) == (k == "relational") for p, k in kinds.items())
    assert ds.info["synthetic"]["relational_fraction"] == 0.8


# ---------------------------------------------------------------- several objects, or none


@pytest.fixture(scope="module")
def grec_examples():
    return list(syn.generate_grec_example(syn.image_rng(3, i), several_fraction=0.4, none_fraction=0.25)
                for i in range(400))


def test_phrases_of_several_objects_or_none_denote_exactly_their_targets(grec_examples):
    kinds = {k: 0 for k in syn.KINDS}
    for _, objects, expressions in grec_examples:
        assert len({p for _, p, _ in expressions}) == len(expressions)  # a phrase once per image
        for targets, phrase, kind in expressions:
            kinds[kind] += 1
            assert syn.resolve(objects, phrase) == targets, (objects, phrase)
            assert (kind == "none") == (targets == []) and (kind == "several") == (len(targets) >= 2)
            if kind == "none":  # deceptive: the image has the colour or the shape, not both together
                words = set(phrase.split())
                assert any(o["color"] in words or o["shape"] in words for o in objects), phrase
    assert kinds["several"] >= 150 and kinds["none"] >= 100 and kinds["attribute"] >= 200, kinds


def test_several_and_none_words_are_the_tiny_tokenizers(grec_examples):
    from fiftyone_grounding.models.encoders import load_tokenizer

    tokenizer = load_tokenizer("tiny:bert")
    used = set()
    for _, _, expressions in grec_examples:
        for _, phrase, _ in expressions:
            used.update(phrase.split())
            assert tokenizer.tokenize(phrase) == phrase.split(), phrase
    assert {"all", "every", "both", "two", "circles", "squares", "triangles", "shapes"} <= used
    assert used <= set(syn.VOCABULARY) | set(syn.SEVERAL_WORDS)


def test_quantified_phrases_resolve_by_their_count():
    objects = [_obj("square", "red", "small", (0.0, 0.0, 0.1, 0.1)), _obj("square", "blue", "small", (0.5, 0.5, 0.6, 0.6)),
               _obj("circle", "red", "large", (0.2, 0.6, 0.5, 0.9))]
    assert syn.resolve(objects, "the two squares") == [0, 1] == syn.resolve(objects, "both small objects")
    assert syn.resolve(objects, "the three squares") == [] and syn.resolve(objects, "all the red shapes") == [0, 2]
    assert syn.resolve(objects, "every red square") == [0] and syn.resolve(objects, "the blue circle") == []


def test_without_several_or_none_the_grec_stream_is_the_plain_one():
    for image_id in range(40):
        _, objects, plain = syn.generate_example(syn.image_rng(5, image_id))
        _, same, grec = syn.generate_grec_example(syn.image_rng(5, image_id))
        assert same == objects and [(t[0], p) for t, p, _ in grec] == plain


def test_the_grec_dataset_has_grefcocos_fields(dataset_name, tmp_path):
    ds = _make(dataset_name, tmp_path, several_fraction=0.5, none_fraction=0.3)
    rows = zip(*ds.values(["ground_truth", "phrase_kind", "no_target", "ann_ids", "categories", "category"]))
    seen = set()
    for gt, kind, no_target, ann_ids, categories, category in rows:
        seen.add(kind)
        assert len(gt.detections) == len(ann_ids) == len(categories) and no_target == (kind == "none")
        assert category == (categories[0] if len(set(categories)) == 1 else None)
    assert {"several", "none", "attribute"} <= seen


def test_an_image_without_the_kind_a_phrase_names_holds_none_of_its_referents():
    """``referent_kind`` / ``image_kinds`` tell training which images lack a phrase's referent
    (absent pairs): where another scene holds no object of the phrase's kind, the phrase denotes
    nothing there (checked with resolve); its own scene holds that kind."""
    scenes = [syn.generate_example(syn.image_rng(11, i), relational_fraction=0.5) for i in range(120)]
    checked = 0
    for _, objects, expressions in scenes:
        kinds = {k for obj in objects for k in syn.object_kinds(obj)}
        for target, phrase in expressions:
            assert syn.referent_kind(phrase) in set(syn.object_kinds(objects[target]))
        for _, other, other_expressions in scenes[:20]:
            for _, phrase in other_expressions:
                if syn.referent_kind(phrase) not in kinds:
                    assert syn.resolve(objects, phrase) == []
                    checked += 1
    assert checked > 500
