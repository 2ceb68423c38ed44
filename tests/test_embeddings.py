"""``GroundingModel`` as FiftyOne's embedder: the frozen image encoder's CLS token or patch mean,
through ``compute_embeddings`` and FiftyOne Brain, with no phrase needed."""

import shutil
import uuid

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fiftyone as fo
import fiftyone.brain as fob

from fiftyone_grounding.data.images import load_rgb, preprocess_image
from fiftyone_grounding.errors import InputError
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.models.build import build_model
from fiftyone_grounding.models.checkpoint import save_checkpoint

IMAGES = 8  # distinct images; one more sample holds a byte-for-byte copy of the first


@pytest.fixture(scope="module")
def network():
    return build_model("tiny").eval()


@pytest.fixture(scope="module")
def model(network):
    """Loaded with no phrase source at all; every image encoded (a feature cache that training
    left for the same tiny encoder would give float16 tokens: test_the_feature_cache_...)."""
    return GroundingModel(network, device="cpu", embedding_cache=False)


@pytest.fixture(scope="module")
def dataset(synthetic_dataset, tmp_path_factory):
    """IMAGES distinct drawn images with their phrases, then a copy of the first image under
    another path (the last sample)."""
    paths = list(dict.fromkeys(synthetic_dataset.values("filepath")))[:IMAGES]
    expressions = dict(zip(*synthetic_dataset.values(["filepath", "expression"])))
    copy = tmp_path_factory.mktemp("copies") / "copy.png"
    shutil.copyfile(paths[0], copy)
    ds = fo.Dataset(f"fog-embed-{uuid.uuid4().hex[:8]}")
    ds.add_samples([fo.Sample(filepath=p, expression=expressions[p]) for p in paths]
                   + [fo.Sample(filepath=str(copy), expression=None)])
    yield ds
    ds.delete()


def encoder_embeddings(network, paths, embedding):
    """The reference: the frozen encoder run by hand on the images as training preprocesses
    them, its own CLS output (``pooler_output``) or the mean of its patch tokens, L2-normalized."""
    config = network.config
    pixels = torch.stack([preprocess_image(load_rgb(p), config.image_size, config.image_mean, config.image_std)
                          for p in paths])  # (N, 3, S, S)
    encoder = network.image_encoder
    with torch.no_grad():
        out = encoder(pixel_values=pixels)
    if embedding == "cls":
        pooled = out.pooler_output  # (N, D)
    else:
        pooled = out.last_hidden_state[:, 1 + encoder.config.num_register_tokens:].mean(1)  # patches only
    return F.normalize(pooled, dim=-1).numpy()


@pytest.mark.parametrize("embedding", ["cls", "mean"])
def test_compute_embeddings_gives_the_frozen_encoders_cls_or_patch_mean(dataset, model, network, embedding):
    embedder = model.with_options(embedding=embedding)
    field = f"emb_{embedding}"
    dataset.compute_embeddings(embedder, embeddings_field=field, batch_size=4)
    got = np.stack(dataset.values(field))
    assert got.shape == (len(dataset), network.image_encoder.config.hidden_size)
    expected = encoder_embeddings(network, dataset.values("filepath"), embedding)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    other = encoder_embeddings(network, dataset.values("filepath"), "mean" if embedding == "cls" else "cls")
    assert np.abs(got - other).max() > 0.1  # the reference tells CLS from the patch mean
    # returned in memory too (what FiftyOne Brain reads), and one image at a time through embed()
    np.testing.assert_allclose(dataset.compute_embeddings(embedder, batch_size=4), got, atol=1e-6)
    first = dataset.first()
    np.testing.assert_allclose(embedder.embed(load_rgb(first.filepath)), got[0], atol=1e-5)
    assert embedder.get_embeddings().shape == (1, got.shape[1])


def test_batches_of_one_equal_batches_of_eight_and_a_copied_image_embeds_alike(dataset, model):
    one = dataset.compute_embeddings(model, batch_size=1)
    eight = dataset.compute_embeddings(model, batch_size=8)
    assert one.shape == eight.shape == (IMAGES + 1, 64)
    np.testing.assert_allclose(one, eight, atol=1e-5)
    np.testing.assert_allclose(eight[-1], eight[0], atol=1e-6)  # the copy of the first image
    assert np.abs(eight[1:IMAGES] - eight[0]).max() > 1e-3  # other images embed otherwise


def test_embedding_needs_no_phrase_and_predicting_still_does(dataset, model):
    """A model with no phrase source embeds; one with a phrase field embeds the same, phrase or
    not (the copy has none) and even when the field does not exist; predictions still refuse to
    run without a phrase source."""
    plain = dataset.compute_embeddings(model, batch_size=4)
    for phrased in (model.with_options(prompt_field="expression"), model.with_options(prompt_field="no_such_field"),
                    model.with_options(prompt="the red circle")):
        np.testing.assert_allclose(dataset.compute_embeddings(phrased, batch_size=4), plain, atol=1e-6)
    np.testing.assert_allclose(dataset.compute_embeddings(model, batch_size=4, prompt_field="expression"), plain,
                               atol=1e-6)
    with pytest.raises(ValueError, match="has no phrases to find"):
        dataset.apply_model(model, label_field="never", batch_size=4)
    assert not dataset.has_sample_field("never")
    dataset.apply_model(model, label_field="pred", prompt_field="expression", batch_size=4)
    assert dataset.count("pred") == IMAGES  # the copy has no phrase, so no box


def test_fiftyone_brain_with_the_model(dataset, model):
    view = dataset.limit(IMAGES)  # not the copy: it would tie with the first image
    results = fob.compute_visualization(view, model=model, method="pca", brain_key="emb_viz", batch_size=4)
    assert np.asarray(results.points).shape == (IMAGES, 2)
    fob.compute_similarity(view, model=model, brain_key="emb_sim", batch_size=4)
    query = view.skip(3).first().id
    nearest = view.sort_by_similarity(query, brain_key="emb_sim", k=3)
    assert len(nearest) == 3 and nearest.first().id == query
    fob.compute_uniqueness(view, model=model, batch_size=4)
    uniqueness = np.array(view.values("uniqueness"))
    assert uniqueness.shape == (IMAGES,) and (uniqueness >= 0).all() and (uniqueness <= 1).all()
    assert uniqueness.max() == pytest.approx(1.0) and uniqueness.min() < 1.0


def test_an_unreadable_image_gets_no_embedding_and_the_run_goes_on(dataset, model, dataset_name, tmp_path):
    ds = fo.Dataset(dataset_name)
    ds.add_samples([fo.Sample(filepath=p) for p in dataset.values("filepath")[:2]]
                   + [fo.Sample(filepath=str(tmp_path / "missing.png"))])
    ds.compute_embeddings(model, embeddings_field="emb", batch_size=1)
    got = ds.values("emb")
    assert got[2] is None and all(e is not None and e.shape == (64,) for e in got[:2])


def test_the_embedding_option_and_its_checks(model, network, tmp_path):
    mean = model.with_options(embedding="mean")
    assert (model.embedding, mean.embedding) == ("cls", "mean") and mean.model is model.model
    assert mean.with_options(prompt="the red circle").embedding == "mean"  # other options keep it
    save_checkpoint(network, tmp_path / "ckpt")
    loaded = GroundingModel.from_checkpoint(tmp_path / "ckpt", device="cpu", embedding="mean")
    assert loaded.embedding == "mean" and loaded.has_embeddings
    with pytest.raises(InputError, match="embedding must be 'cls'"):
        model.with_options(embedding="max")
    with pytest.raises(InputError, match="embedding must be 'cls'"):
        GroundingModel(network, device="cpu", embedding="pooled")
    with pytest.raises(InputError, match="no embeddings yet"):
        model.with_options().get_embeddings()


@pytest.mark.parametrize("preset", ["tiny-fusion", "tiny-adapter"])
def test_every_architecture_embeds_with_its_plain_frozen_encoder(preset, synthetic_dataset):
    """The fusion architecture's layers and the adapter architecture's adapters play no part."""
    network = build_model(preset).eval()
    paths = list(dict.fromkeys(synthetic_dataset.values("filepath")))[:2]
    got = GroundingModel(network, device="cpu").embed_all([load_rgb(p) for p in paths])
    np.testing.assert_allclose(got, encoder_embeddings(network, paths, "cls"), atol=1e-5)


def test_the_feature_cache_serves_the_images_it_holds_and_the_others_are_encoded(network, tmp_path):
    """Images whose final encoder tokens a feature cache holds are read from it, not decoded: the
    embedding is the encoded one to float16 rounding even once the file is gone, and a batch may
    mix cached and decoded images."""
    from fiftyone_grounding.data.cache import default_feature_cache_dir, open_feature_cache
    from fiftyone_grounding.data.synthetic import make_synthetic_dataset

    ds = make_synthetic_dataset(f"fog-embed-cache-{uuid.uuid4().hex[:8]}", num_images=6, out_dir=str(tmp_path),
                                seed=3, persistent=False, progress=False)
    try:
        paths = sorted(set(ds.values("filepath")))
        encoded = GroundingModel(network, device="cpu", embedding_cache=False)
        reference = dict(zip(ds.values("id"), ds.compute_embeddings(encoded, batch_size=4)))
        cache = open_feature_cache(default_feature_cache_dir(), network)
        cache.build(paths[:4], network.encode_images, network.config, "cpu", progress=False)
        cached = GroundingModel(network, device="cpu")
        assert cached.embedding_cache() is not None
        for path in paths[:4]:
            shutil.move(path, path + ".gone")  # only the cache can give these now
        got = dict(zip(ds.values("id"), ds.compute_embeddings(cached, batch_size=4)))
        for sid, vector in reference.items():
            np.testing.assert_allclose(got[sid], vector, atol=2e-3)
        assert GroundingModel(network, device="cpu").with_options(embedding_cache=False).embedding_cache() is None
    finally:
        ds.delete()
