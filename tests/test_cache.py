"""The frozen-feature cache: same losses as pixels, right invalidation, real mirrored views,
shards that survive reopening, bounded memory. Correctness only: nothing here is timed."""

import io
import json
import tracemalloc
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fiftyone_grounding.data.cache import VIEWS, cache_key, open_feature_cache
from fiftyone_grounding.models.encoder_specs import TINY_ENCODER_CONFIGS, TINY_IMAGE_ENCODER
from fiftyone_grounding.data.batching import GroupBatchSampler
from fiftyone_grounding.data.augment import hflip_boxes
from fiftyone_grounding.data.records import GroundingRecords
from fiftyone_grounding.data.batching import Collator
from fiftyone_grounding.data.datasets import GroundingDataset
from fiftyone_grounding.data.text import swap_left_right
from fiftyone_grounding.models.losses import grounding_loss
from fiftyone_grounding.models.build import build_model, build_tokenizer

# Features are stored as float16: ~3 significant digits.
FP16_RTOL = 2e-3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def fusion_model():
    """The fusion architecture's cache holds several taps (two DINOv3 layers, one pooled)."""
    torch.manual_seed(0)
    return build_model("tiny-fusion").eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six small drawn JPEG/PNG images with objects near the left or right edge."""
    folder = tmp_path_factory.mktemp("cache_images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        w, h = 96 + 8 * i, 72
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        x0 = 4 if i % 2 else w - 30
        draw.ellipse((x0, 20, x0 + 24, 44), fill=(230, 40, 40))
        path = folder / f"img{i}.{'jpg' if i % 2 else 'png'}"
        im.save(path)
        paths.append(str(path))
    return paths


def _records(paths, per_image=3):
    r = GroundingRecords()
    words = ["the red circle on the left", "the thing at the right", "the top one", "the bright spot"]
    for i, path in enumerate(paths):
        for j in range(per_image):
            x0 = 0.05 + 0.1 * j
            r.sample_ids.append(f"s{i}-{j}")
            r.filepaths.append(path)
            r.phrases.append(words[(i + j) % len(words)])
            r.boxes.append([x0, 0.2, x0 + 0.3 + 0.05 * i, 0.7])
    return r


def _built_cache(tmp_path, model, paths, **kwargs):
    cache = open_feature_cache(tmp_path / "features", model)
    cache.build(paths, model.encode_images, model.config, "cpu", progress=False, **kwargs)
    return cache


def _pixels(model, path, flip=False):
    """(1, 3, S, S): the training resize + normalization, mirrored when asked."""
    cfg = model.config
    ds = GroundingDataset(_records([path], 1), cfg.image_size, cfg.image_mean, cfg.image_std)
    x = ds[0]["pixel_values"]
    return (x.flip(-1) if flip else x)[None]


def _output(model, batch):
    return model(pixel_values=batch.get("pixel_values"), image_features=batch.get("image_features"),
                 input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 image_index=batch["image_index"])


def _forward(model, batch):
    """(B, 4) boxes, and the quality logit as a fifth column where the model has the head."""
    out = _output(model, batch)
    return out.boxes if out.quality is None else torch.cat([out.boxes, out.quality[:, None]], 1)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = _output(model, batch)
    loss = grounding_loss(out, batch["boxes"], model.config.loss_weights)["loss"]
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return out.boxes.detach(), loss.item(), grads


@pytest.mark.parametrize("which", ["model", "fusion_model"])
def test_cached_training_step_matches_pixels(tmp_path, which, images, request):
    model = request.getfixturevalue(which)
    cfg = model.config
    cache = _built_cache(tmp_path, model, images)
    records = _records(images)
    collate = Collator(build_tokenizer(cfg), cfg.max_text_len)
    pix = GroundingDataset(records, cfg.image_size, cfg.image_mean, cfg.image_std, augment="none")
    cached = GroundingDataset(records, cfg.image_size, cfg.image_mean, cfg.image_std, augment="none",
                              feature_cache=cache)
    b_pix = collate([pix[i] for i in range(len(pix))])
    b_cache = collate([cached[i] for i in range(len(cached))])
    assert b_cache["image_features"].dtype == torch.float16 and "pixel_values" not in b_cache
    assert b_cache["image_features"].shape[1:] == model.image_feature_shape()
    assert torch.equal(b_pix["input_ids"], b_cache["input_ids"]) and torch.equal(b_pix["boxes"], b_cache["boxes"])

    model.train()
    try:
        pred_p, loss_p, grad_p = _loss_and_grads(model, b_pix)
        pred_c, loss_c, grad_c = _loss_and_grads(model, b_cache)
    finally:
        model.eval()
    assert loss_c == pytest.approx(loss_p, rel=FP16_RTOL)
    torch.testing.assert_close(pred_c, pred_p, atol=2e-3, rtol=0)
    assert torch.nn.functional.cosine_similarity(grad_p, grad_c, dim=0) > 0.999


def test_cached_flip_view_matches_flipped_pixels(tmp_path, model, images):
    """An item served from the mirrored view trains like the mirrored image with mirrored
    boxes and left/right-swapped phrases."""
    cfg = model.config
    cache = _built_cache(tmp_path, model, images)
    records = _records(images)
    cached = GroundingDataset(records, cfg.image_size, cfg.image_mean, cfg.image_std, augment="flip",
                              feature_cache=cache)
    plain = GroundingDataset(records, cfg.image_size, cfg.image_mean, cfg.image_std, augment="none")
    collate = Collator(build_tokenizer(cfg), cfg.max_text_len)
    seen = set()
    for epoch in range(6):
        cached.set_epoch(epoch)
        for index in range(len(cached)):
            item = cached[index]
            original = np.asarray([records.boxes[i] for i in cached.groups[index]], np.float32)
            flipped = not np.allclose(item["boxes"].numpy(), original)
            if flipped in seen:
                continue
            seen.add(flipped)
            base = plain[index]
            if flipped:
                np.testing.assert_allclose(item["boxes"].numpy(), hflip_boxes(original), atol=1e-6)
                assert item["phrases"] == [swap_left_right(p) for p in base["phrases"]]
                image = base["pixel_values"].flip(-1)  # the same as flipping before normalizing
            else:
                assert item["phrases"] == base["phrases"]
                image = base["pixel_values"]
            ref = collate([dict(base, pixel_values=image, boxes=item["boxes"], phrases=item["phrases"])])
            got = collate([item])
            with torch.no_grad():
                p_ref, p_got = _forward(model, ref), _forward(model, got)
            torch.testing.assert_close(p_got, p_ref, atol=2e-3, rtol=0)
    assert seen == {True, False}  # both views were served


def test_mirrored_view_is_the_encoded_mirrored_image(tmp_path, model, images):
    cache = _built_cache(tmp_path, model, images[:2])
    assert len(VIEWS) == 2
    for path in images[:2]:
        with torch.no_grad():
            original = model.encode_images(_pixels(model, path))[0]
            mirrored = model.encode_images(_pixels(model, path, flip=True))[0]
        v0, v1 = cache.get(path, 0).float(), cache.get(path, 1).float()
        scale = original.abs().max()
        torch.testing.assert_close(v0, original, atol=FP16_RTOL * scale, rtol=FP16_RTOL)
        torch.testing.assert_close(v1, mirrored, atol=FP16_RTOL * scale, rtol=FP16_RTOL)
        # Not a free by-product of view 0: the features of a mirrored image differ.
        assert not torch.allclose(v1, v0, atol=0.05 * scale)


def test_grouped_cached_batches_equal_one_phrase_at_a_time(tmp_path, images):
    """Through the training pipeline (sampler + collator), for the seed's mean-pooled text
    queries, the [REG] query and the fusion architecture."""
    for preset, overrides in (("tiny", dict(query="text", pos_embed="none", box_format="xyxy", quality_head=False,
                                            presence_head=False, loss_weights={"diou": 1.0})), ("tiny", {}), ("tiny-fusion", {})):
        torch.manual_seed(0)
        model = build_model(preset, **overrides).eval()
        cfg = model.config
        cache = _built_cache(tmp_path / f"{preset}-{cfg.query}", model, images)
        records = _records(images)
        ds = GroundingDataset(records, cfg.image_size, cfg.image_mean, cfg.image_std, feature_cache=cache)
        collate = Collator(build_tokenizer(cfg), cfg.max_text_len)
        sampler = GroupBatchSampler(ds.group_sizes(), batch_size=8, shuffle=False)
        grouped, single = {}, {}
        with torch.no_grad():
            for batch_groups in sampler:
                batch = collate([ds[g] for g in batch_groups])
                assert batch["image_features"].shape[0] < len(batch["sample_ids"])  # images shared
                for sid, box in zip(batch["sample_ids"], _forward(model, batch)):
                    grouped[sid] = box
            for g in range(len(ds)):
                item = ds[g]
                for k, sid in enumerate(item["sample_ids"]):
                    one = dict(item, phrases=[item["phrases"][k]], boxes=item["boxes"][k:k + 1], sample_ids=[sid])
                    single[sid] = _forward(model, collate([one]))[0]
        assert grouped.keys() == single.keys() and len(grouped) == len(records)
        for sid in grouped:
            torch.testing.assert_close(grouped[sid], single[sid], atol=1e-5, rtol=0)


def test_key_changes_with_encoder_resolution_and_normalization(model):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = model.config
    key = cache_key(cfg, model.image_encoder)
    assert cache_key(cfg, build_model("tiny").image_encoder) == key  # nothing changed
    assert cache_key(type(cfg).from_dict({**cfg.to_dict(), "image_size": 32}), model.image_encoder) != key
    assert cache_key(type(cfg).from_dict({**cfg.to_dict(), "image_mean": (0.5, 0.5, 0.5)}),
                     model.image_encoder) != key
    values = {k: v for k, v in TINY_ENCODER_CONFIGS[TINY_IMAGE_ENCODER].items() if k != "model_type"}
    deeper = DINOv3ViTModel(DINOv3ViTConfig(**dict(values, num_hidden_layers=3)))
    assert cache_key(cfg, deeper) != key
    assert cache_key(type(cfg).from_dict({**cfg.to_dict(), "image_encoder": "/elsewhere/dinov3"}),
                     model.image_encoder) != key


def test_key_changes_with_encoder_weights(model):
    """Same id and architecture, other weights (random init vs the loaded ones, or a
    fine-tuned copy in the same folder): the old features must not be served."""
    cfg = model.config
    torch.manual_seed(123)
    random_weights = build_model("tiny", weights=False).image_encoder
    assert random_weights.config.to_dict() == model.image_encoder.config.to_dict()
    assert cache_key(cfg, random_weights) != cache_key(cfg, model.image_encoder)


def _must_not_encode(pixels):
    raise AssertionError("the cache re-encoded an image it already holds")


def test_unchanged_cache_is_reused_without_encoding(tmp_path, model, images):
    cfg = model.config
    first = _built_cache(tmp_path, model, images)
    reopened = open_feature_cache(tmp_path / "features", build_model("tiny"))
    assert reopened.dir == first.dir
    assert reopened.build(images, _must_not_encode, cfg, "cpu", progress=False) == 0
    changed = type(cfg).from_dict({**cfg.to_dict(), "image_size": 32})
    other = open_feature_cache(tmp_path / "features", build_model(config=changed))
    assert other.dir != first.dir and not any(p in other for p in images)


def test_fit_encodes_once_then_reuses_the_cache(synthetic_dataset, tmp_path):
    from fiftyone_grounding.engine.fit import fit

    view = synthetic_dataset.match({"split": "train"}).limit(12)
    kwargs = dict(preset="tiny", epochs=1, batch_size=8, train_split=None, val_split=None, progress=False,
                  cpu=True, cache_dir=str(tmp_path / "features"))
    out = io.StringIO()
    with redirect_stdout(out):
        fit(view, out_dir=str(tmp_path / "a"), **kwargs)
    assert "Cached image features of" in out.getvalue() and "Cached text features of" in out.getvalue()
    (folder,) = [p for p in (tmp_path / "features").iterdir() if p.name != "text"]
    (text_folder,) = (tmp_path / "features" / "text").iterdir()
    shards = sorted(p.name for p in folder.glob("shard-*.npy"))
    text_shards = sorted(p.name for p in text_folder.glob("shard-*.npy"))
    out = io.StringIO()
    with redirect_stdout(out):
        fit(view, out_dir=str(tmp_path / "b"), **kwargs)
    assert "Cached image features of" not in out.getvalue() and "Cached text features" not in out.getvalue()
    assert sorted(p.name for p in folder.glob("shard-*.npy")) == shards
    assert sorted(p.name for p in text_folder.glob("shard-*.npy")) == text_shards


@pytest.mark.parametrize("preset, budget, reason", [
    ("tiny-fusion", 200.0, None),
    ("tiny-fusion", 1e-6, "is over cache_budget_gb=1e-06"),
    ("tiny-adapter", 200.0, "the adapter architecture reads the phrase inside the image encoder"),
])
def test_fit_caches_what_it_can_and_says_why_not(synthetic_dataset, tmp_path, preset, budget, reason):
    """The fusion caches its taps; over the disk budget, or for the adapter (whose image
    features depend on the phrase), the images are encoded on the fly and fit says why."""
    from fiftyone_grounding.engine.fit import fit

    view = synthetic_dataset.match({"split": "train"}).limit(12)
    out = io.StringIO()
    with redirect_stdout(out):
        fit(view, preset=preset, epochs=1, batch_size=8, train_split=None, val_split=None, progress=False, cpu=True,
            cache_dir=str(tmp_path / "features"), cache_budget_gb=budget, out_dir=str(tmp_path / "run"))
    printed = out.getvalue()
    assert ("Cached image features of" in printed) == (reason is None)
    if reason is None:
        assert "Feature cache off" not in printed
    else:
        assert "Feature cache off" in printed and reason in printed
        assert not (tmp_path / "features").exists() or not [p for p in (tmp_path / "features").iterdir()
                                                            if p.name != "text"]
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])


def test_cached_text_features_match_the_text_encoder(tmp_path, model):
    from fiftyone_grounding.data.cache import open_text_cache
    from fiftyone_grounding.data.batching import Collator
    from fiftyone_grounding.models.build import build_tokenizer

    tokenizer = build_tokenizer(model.config)
    collate = Collator(tokenizer, model.config.max_text_len)
    phrases = ["the red circle", "the small blue square on the left", "the large white triangle at the top",
               "the " + "very " * 40 + "long one"]  # cut to max_text_len
    cache = open_text_cache(tmp_path / "features", model.config, model.text_encoder, tokenizer)
    assert cache.build(phrases, model, collate.tokenize, "cpu", batch_size=3, progress=False) == 4
    reopened = open_text_cache(tmp_path / "features", model.config, model.text_encoder, tokenizer)
    assert reopened.dir == cache.dir and all(p in reopened for p in phrases)
    tokens = collate.tokenize(phrases)
    with torch.no_grad():
        direct = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
    for i, p in enumerate(phrases):
        n = int(tokens["attention_mask"][i].sum())
        assert reopened.get(p).shape == (n, direct.shape[-1])
        assert torch.allclose(reopened.get(p).float(), direct[i, :n], atol=2e-2, rtol=1e-2)
    # The same batch through the model: cached text gives the boxes that tokens give.
    cached = Collator(tokenizer, model.config.max_text_len, text_cache=reopened)
    item = {"image_features": torch.randn(69, 64).half(), "boxes": torch.rand(4, 4), "phrases": phrases,
            "sample_ids": list("abcd")}
    a, b = collate([item]), cached([item])
    with torch.no_grad():
        boxes_a = model(image_features=a["image_features"], input_ids=a["input_ids"],
                        attention_mask=a["attention_mask"], image_index=a["image_index"]).boxes
        boxes_b = model(image_features=b["image_features"], text_features=b["text_features"],
                        attention_mask=b["attention_mask"], image_index=b["image_index"]).boxes
    assert torch.allclose(boxes_a, boxes_b, atol=5e-3)
    # Another max_text_len is another cache.
    changed = type(model.config).from_dict({**model.config.to_dict(), "max_text_len": 8})
    assert open_text_cache(tmp_path / "features", changed, model.text_encoder, tokenizer).dir != cache.dir


def test_index_survives_reopen_and_new_images_go_to_new_shards(tmp_path, model, images):
    cfg = model.config
    cache = _built_cache(tmp_path, model, images[:3])
    shard_of = {p: cache._index[p][0] for p in images[:3]}
    assert len(set(shard_of.values())) == 1
    before = {p: cache.get(p, 1) for p in images[:3]}

    reopened = open_feature_cache(tmp_path / "features", model)
    assert all(p in reopened for p in images[:3]) and not any(p in reopened for p in images[3:])
    for p in images[:3]:
        assert torch.equal(reopened.get(p, 1), before[p])
    assert reopened.build(images, model.encode_images, cfg, "cpu", progress=False) == 3

    again = open_feature_cache(tmp_path / "features", model)
    assert all(p in again for p in images)
    assert {p: again._index[p][0] for p in images[:3]} == shard_of  # old rows untouched
    new_shards = {again._index[p][0] for p in images[3:]}
    assert len(new_shards) == 1 and not new_shards & set(shard_of.values())
    assert len(list(again.dir.glob("shard-*.npy"))) == 2
    assert not list(again.dir.glob("*.tmp*"))
    for p in images[:3]:
        assert torch.equal(again.get(p, 1), before[p])
    index = json.loads((again.dir / "index.json").read_text())
    assert set(index["rows"]) == set(images)


def test_unreadable_image_is_recorded_not_cached(tmp_path, model, images):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    cache = _built_cache(tmp_path, model, images[:1] + [str(bad)])
    assert images[0] in cache and str(bad) not in cache
    assert "cannot decode" in cache.error(str(bad))
    reopened = open_feature_cache(tmp_path / "features", model)
    assert reopened.error(str(bad))
    # Still broken: tried again, nothing reaches the encoder, the reason stays.
    assert reopened.build([str(bad)], _must_not_encode, model.config, "cpu", progress=False) == 0
    assert "cannot decode" in reopened.error(str(bad))
    # Fixed on disk: the next build caches it and forgets the error.
    Image.new("RGB", (40, 30), (0, 128, 255)).save(bad, format="JPEG")
    assert reopened.build([str(bad)], model.encode_images, model.config, "cpu", progress=False) == 1
    assert str(bad) in reopened and reopened.error(str(bad)) is None


def _peak_build_bytes(root, model, paths, shard_bytes):
    cache = open_feature_cache(root, model)
    cache.shard_bytes = shard_bytes
    tracemalloc.start()  # numpy's buffers are traced; torch's are not (they are per batch anyway)
    try:
        cache.build(paths, model.encode_images, model.config, "cpu", batch_size=2, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return cache, peak


def test_memory_is_bounded_by_shard_size(tmp_path, model, images):
    per_image = len(VIEWS) * (1 + 4 + (64 // 8) ** 2) * 64 * 2  # views x tokens x hidden x fp16
    shard_bytes = 2 * per_image  # flush every two images
    many = images * 4  # 24 paths: copies under other names
    paths = []
    for i, p in enumerate(many):
        dst = tmp_path / "many" / f"{i}_{p.rsplit('/', 1)[-1]}"
        dst.parent.mkdir(exist_ok=True)
        dst.write_bytes(open(p, "rb").read())
        paths.append(str(dst))

    _peak_build_bytes(tmp_path / "warm", model, paths[:2], shard_bytes)  # one-off imports (peak discarded)
    cache, peak_many = _peak_build_bytes(tmp_path / "a", model, paths, shard_bytes)
    _, peak_few = _peak_build_bytes(tmp_path / "b", model, paths[:4], shard_bytes)
    _, peak_unbounded = _peak_build_bytes(tmp_path / "c", model, paths, 2**40)  # one shard at the end
    # Six times the images, about the same peak (the index and path strings grow a little, and
    # one-off allocations differ from run to run by a few images' worth); holding every feature
    # until the end (the control) grows with the dataset.
    assert peak_many < peak_few + 16 * per_image
    assert peak_many - peak_few < (peak_unbounded - peak_few) / 3
    assert cache.nbytes_per_image() == per_image
    shards = list(cache.dir.glob("shard-*.npy"))
    assert len(shards) == len(paths) // 2
    for shard in shards:
        assert np.load(shard, mmap_mode="r").shape[0] == 2
    for p in paths:
        assert cache.get(p, 0).shape == (1 + 4 + 64, 64)
