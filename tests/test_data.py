"""Data: phrase/box transforms move together, records are validated, batches group images."""

import numpy as np
import pytest
import torch
from PIL import Image

import fiftyone as fo

from fiftyone_grounding.data.augment import hflip
from fiftyone_grounding.data.batching import Collator, GroupBatchSampler
from fiftyone_grounding.data.datasets import GroundingDataset
from fiftyone_grounding.data.records import read_records
from fiftyone_grounding.data.images import load_rgb
from fiftyone_grounding.data.text import swap_left_right
from fiftyone_grounding.models.encoders import load_tokenizer


def test_swap_left_right_whole_words_only():
    assert swap_left_right("the man on the left") == "the man on the right"
    assert swap_left_right("Right guy, LEFT arm, leftmost cup") == "Left guy, RIGHT arm, rightmost cup"
    assert swap_left_right("the bright light, leftover rights") == "the bright light, leftover rights"
    assert swap_left_right(swap_left_right("left of the right one")) == "left of the right one"


def test_hflip_moves_box_and_phrase_together():
    image = np.zeros((10, 20, 3), np.uint8)
    image[2:4, 1:5] = 255  # object near the left edge
    boxes = np.array([[1 / 20, 0.2, 5 / 20, 0.4]], np.float32)
    flipped, fboxes, phrases = hflip(image, boxes, ["the white box on the left"])
    assert phrases == ["the white box on the right"]
    np.testing.assert_allclose(fboxes, [[15 / 20, 0.2, 19 / 20, 0.4]], atol=1e-6)
    assert flipped[2:4, 15:19].min() == 255 and flipped[:, :15].max() == 0


def _dataset_with_rows(name, tmp_path, rows):
    path = tmp_path / "img.png"
    Image.new("RGB", (32, 24), (10, 20, 30)).save(path)
    ds = fo.Dataset(name)
    samples = []
    for phrase, box in rows:
        s = fo.Sample(filepath=str(path), expression=phrase, split="train")
        if box is not None:
            s["ground_truth"] = fo.Detections(detections=[fo.Detection(label="x", bounding_box=box)])
        samples.append(s)
    ds.add_samples(samples)
    return ds


def test_read_records_validates_rows(dataset_name, tmp_path):
    ds = _dataset_with_rows(dataset_name, tmp_path, [
        ("the red one", [0.1, 0.1, 0.2, 0.2]),
        ("", [0.1, 0.1, 0.2, 0.2]),
        ("   ", [0.1, 0.1, 0.2, 0.2]),
        (None, [0.1, 0.1, 0.2, 0.2]),
        ("zero area", [0.1, 0.1, 0.0, 0.2]),
        ("negative", [0.5, 0.1, -0.2, 0.2]),
        ("nan", [float("nan"), 0.1, 0.2, 0.2]),
        ("no box", None),
        ("partly outside", [0.9, 0.9, 0.3, 0.3]),
    ])
    rec = read_records(ds)
    assert rec.phrases == ["the red one", "partly outside"]
    assert rec.boxes[1] == pytest.approx([0.9, 0.9, 1.0, 1.0])
    reasons = sorted(r for _, r in rec.skipped)
    assert len(reasons) == 7
    assert reasons.count("missing or empty phrase") == 3
    assert "box has non-finite coordinates" in reasons and "box has zero or negative area" in reasons
    with pytest.raises(ValueError, match="no field 'caption'"):
        read_records(ds, phrase_field="caption")


def test_read_records_skips_and_counts_what_one_box_models_cannot_learn(dataset_name, tmp_path):
    box = [0.1, 0.1, 0.2, 0.2]
    ds = _dataset_with_rows(dataset_name, tmp_path, [("one", box), ("two", box), ("none", None), ("plain", None)])
    two = ds.match(fo.ViewField("expression") == "two").first()
    two.ground_truth.detections.append(fo.Detection(label="x", bounding_box=[0.5, 0.5, 0.2, 0.2]))
    two.save()
    ds.set_values("no_target", [False, False, True, None])  # gRefCOCO's mark of a phrase with no object
    rec = read_records(ds)
    assert rec.phrases == ["one"]
    assert sorted(r for _, r in rec.skipped) == ["no box in 'ground_truth'",
                                                 "no target (the phrase refers to nothing): one-box models skip it",
                                                 "several targets: one-box models skip them"]


def test_multi_box_models_read_every_box_and_the_phrases_of_nothing(dataset_name, tmp_path):
    box = [0.1, 0.1, 0.2, 0.2]
    ds = _dataset_with_rows(dataset_name, tmp_path, [("one", box), ("two", box), ("none", None), ("plain", None)])
    two = ds.match(fo.ViewField("expression") == "two").first()
    two.ground_truth.detections.append(fo.Detection(label="x", bounding_box=[0.5, 0.5, 0.2, 0.2]))
    two.save()
    ds.set_values("no_target", [False, False, True, None])
    rec = read_records(ds, several=True)
    assert rec.phrases == ["one", "two", "none"]
    assert rec.targets == [[[0.1, 0.1, 0.30000000000000004, 0.30000000000000004]],
                           [[0.1, 0.1, 0.30000000000000004, 0.30000000000000004], [0.5, 0.5, 0.7, 0.7]], []]
    assert np.isnan(rec.boxes[2]).all() and rec.boxes[1] == rec.targets[1][0]
    assert [r for _, r in rec.skipped] == ["no box in 'ground_truth'"]  # no box and not marked no_target
    assert rec.mean_box() == pytest.approx(np.mean([b for t in rec.targets for b in t], 0).tolist())


def test_several_boxes_per_phrase_go_through_augmentation_and_the_collator(dataset_name, tmp_path):
    """Every box of every phrase of an image goes through the box-preserving crop and the flip
    (``test_augment.py`` checks that the crop keeps boxes whole); the collator hands each phrase's
    boxes over, none for a phrase of nothing, and its first box (NaN for none) beside them."""
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(dataset_name, num_images=30, out_dir=str(tmp_path), seed=2, several_fraction=0.6,
                                none_fraction=0.3, persistent=False, progress=False)
    rec = read_records(ds, several=True)
    assert len(rec) == len(ds) and any(len(t) > 1 for t in rec.targets) and any(not t for t in rec.targets)
    plain = GroundingDataset(rec, 64, (0.5,) * 3, (0.25,) * 3)
    moved = GroundingDataset(rec, 64, (0.5,) * 3, (0.25,) * 3, augment="scale+flip", seed=1)
    collate = Collator(load_tokenizer("tiny:bert"), 16)
    changed = 0
    for index in range(len(plain)):
        a, b = plain[index], moved[index]
        # a crop keeps the phrases whose boxes it holds whole (at least the one it was drawn for)
        assert b["sample_ids"] and set(b["sample_ids"]) <= set(a["sample_ids"])
        a_targets = dict(zip(a["sample_ids"], a["targets"]))
        assert [len(a_targets[sid]) for sid in b["sample_ids"]] == [len(t) for t in b["targets"]]
        for tb in b["targets"]:
            assert ((tb >= 0) & (tb <= 1)).all() and (tb[:, 2:] > tb[:, :2]).all()
        changed += not all(torch.equal(a_targets[sid], tb) for sid, tb in zip(b["sample_ids"], b["targets"]))
        batch = collate([b])
        assert len(batch["targets"]) == len(b["phrases"]) == batch["boxes"].shape[0]
        for t, first in zip(batch["targets"], batch["boxes"]):
            assert torch.equal(first, t[0]) if len(t) else torch.isnan(first).all()
    assert changed > len(plain) // 4  # the augmentation did move boxes


def test_dataset_groups_phrases_by_image_and_collates(synthetic_dataset):
    rec = read_records(synthetic_dataset)
    ds = GroundingDataset(rec, 64, (0.5,) * 3, (0.25,) * 3, augment="flip", seed=0)
    assert len(ds) == len(set(rec.filepaths))
    assert sum(ds.group_sizes()) == len(rec)
    sampler = GroupBatchSampler(ds.group_sizes(), batch_size=8, seed=0)
    batches = list(sampler)
    assert sorted(g for b in batches for g in b) == list(range(len(ds)))
    assert all(sum(ds.group_sizes()[g] for g in b) <= 8 for b in batches)
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled per epoch...
    sampler.set_epoch(0)
    assert list(sampler) == batches  # ...and reproducibly
    collate = Collator(load_tokenizer("tiny:bert"), 16)
    batch = collate([ds[g] for g in batches[0]])
    n_img, n_phr = len(batches[0]), sum(ds.group_sizes()[g] for g in batches[0])
    assert batch["pixel_values"].shape == (n_img, 3, 64, 64)
    assert batch["boxes"].shape == (n_phr, 4) and batch["image_index"].max() == n_img - 1
    assert batch["input_ids"].shape[0] == n_phr


def test_augmentation_is_deterministic_per_epoch(synthetic_dataset):
    ds = GroundingDataset(read_records(synthetic_dataset), 64, (0.5,) * 3, (0.25,) * 3, augment="scale+flip")
    a = ds[3]
    assert torch.equal(a["pixel_values"], ds[3]["pixel_values"]) and a["phrases"] == ds[3]["phrases"]
    boxes = torch.cat([ds[i]["boxes"] for i in range(len(ds))])
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2] > boxes[:, 0]).all()


def test_persistent_workers_follow_the_epoch(synthetic_dataset):
    """Workers that live through all epochs (a copy of the dataset made at epoch 0) serve each
    epoch's augmentation, because the sampler tags every index with its epoch."""
    ds = GroundingDataset(read_records(synthetic_dataset.limit(24)), 64, (0.5,) * 3, (0.25,) * 3,
                          augment="scale+flip", seed=0)
    sampler = GroupBatchSampler(ds.group_sizes(), batch_size=8, seed=0, tag_epoch=True)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2, persistent_workers=True,
                                         collate_fn=lambda items: items)
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        got = [item for batch in loader for item in batch]
        ds.set_epoch(epoch)  # the main process's own copy, for the expected items
        want = [ds[g] for batch in sampler for _, g in batch]
        assert [w["sample_ids"] for w in want] == [g["sample_ids"] for g in got]
        for g, w in zip(got, want):
            assert torch.equal(g["pixel_values"], w["pixel_values"]) and torch.equal(g["boxes"], w["boxes"])
        seen.append(torch.stack([g["pixel_values"] for g in sorted(got, key=lambda i: i["sample_ids"])]))
    assert not torch.equal(seen[0], seen[1])  # the epochs did differ


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "P-transparent", "I;16", "CMYK"])
def test_load_rgb_converts_modes(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    if mode == "I;16":
        Image.fromarray(np.full((8, 8), 60000, np.uint16)).save(path)
    elif mode == "P-transparent":  # a palette image whose one colour is transparent: black after compositing
        image = Image.new("P", (8, 8), 1)
        image.putpalette([0, 0, 0, 200, 100, 50])
        image.save(path, transparency=1)
    else:
        Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode).save(path)
    out = load_rgb(str(path))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    if mode == "P-transparent":
        assert out.max() == 0


def test_load_rgb_reports_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_rgb(str(tmp_path / "missing.jpg"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="cannot decode"):
        load_rgb(str(bad))


def test_an_absent_pair_takes_the_image_nearest_to_holding_the_referent():
    """Of the images that lack "yellow triangle", the one with a red triangle and a yellow circle
    (its kinds share both words) is taken, not the one of blue squares; never the phrase's own."""
    import numpy as np

    from fiftyone_grounding.data.absent import add_absent_pairs
    from fiftyone_grounding.data.synthetic import object_kinds

    def kinds(*objects):
        return sorted({k for size, color, shape in objects for k in object_kinds(dict(size=size, color=color,
                                                                                       shape=shape))})

    batch = {"phrases": ["the yellow triangle", "the blue square", "the red triangle"],
             "image_index": torch.tensor([0, 1, 2]), "boxes": torch.rand(3, 4),
             "input_ids": torch.arange(3)[:, None], "attention_mask": torch.ones(3, 1, dtype=torch.long),
             "categories": ["yellow triangle", "blue square", "red triangle"],
             "image_kinds": [kinds(("small", "yellow", "triangle")), kinds(("large", "blue", "square")),
                             kinds(("small", "red", "triangle"), ("small", "yellow", "circle"))]}
    for seed in range(10):
        paired = add_absent_pairs(batch, 1.0, np.random.default_rng(seed))
        pairs = dict(zip(paired["phrases"][3:], paired["image_index"][3:].tolist()))
        assert pairs["the yellow triangle"] == 2  # near: a triangle and a yellow thing, no yellow triangle
        assert pairs["the red triangle"] == 0  # a triangle (yellow), no red one
        assert pairs["the blue square"] in (0, 2)
