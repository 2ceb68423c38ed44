"""DINOv3 on every transformers version pyproject.toml allows (4.56 up to 5.x): the explicit taps,
the blocks of both module layouts, the models built on them, and the cache keys that tell the
versions apart. CI runs this file on 5.x (``make test``) and on the floor, 4.56.2 (``make test-floor``)."""

import sys

import pytest
import torch
from torch import nn

from transformers import DINOv3ViTConfig, DINOv3ViTModel

from fiftyone_grounding.data.cache import cache_key, text_cache_key
from fiftyone_grounding.models.config import get_config
from fiftyone_grounding.models.encoder_specs import TINY_ENCODER_CONFIGS
from fiftyone_grounding.models.encoders import (dinov3_blocks, dinov3_taps, load_encoder, load_tokenizer,
                                         tiny_encoder_dir, transformers_major)
from fiftyone_grounding.errors import ConfigError
from fiftyone_grounding.models.build import build_model, build_tokenizer


def set_transformers_version(monkeypatch, version: str) -> None:
    """Pretend another transformers version is installed (the module object in ``sys.modules``
    now: loading a model may put a new one there)."""
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)


def three_layer_dinov3() -> DINOv3ViTModel:
    """The tiny DINOv3 with three blocks: two taps that are not the last."""
    values = dict(TINY_ENCODER_CONFIGS["tiny:dinov3"], num_hidden_layers=3)
    values.pop("model_type")
    torch.manual_seed(0)
    return DINOv3ViTModel(DINOv3ViTConfig(**values)).eval()


@torch.no_grad()
def test_taps_are_the_block_outputs_before_the_final_norm():
    """Non-final taps equal ``hidden_states[i]`` and the final norm of the last tap equals
    ``last_hidden_state``: true on 4.x (whose ``hidden_states[-1]`` is normed) and 5.x alike."""
    encoder = three_layer_dinov3()
    pixels = torch.randn(2, 3, 64, 64)
    out = encoder(pixel_values=pixels, output_hidden_states=True)
    depth = len(dinov3_blocks(encoder))
    taps = dinov3_taps(encoder, pixels, list(range(depth + 1)))
    assert len(out.hidden_states) == depth + 1
    for i in range(depth):  # 0: the embeddings, then every block but the last
        torch.testing.assert_close(taps[i], out.hidden_states[i], rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.norm(taps[-1]), out.last_hidden_state, rtol=0, atol=1e-5)
    assert not torch.allclose(taps[-1], out.last_hidden_state, atol=1e-2)  # the last tap is not normed
    # a subset, out of the order the blocks run in, gives the same tensors
    for got, i in zip(dinov3_taps(encoder, pixels, [2, 1]), [2, 1]):
        torch.testing.assert_close(got, taps[i], rtol=0, atol=0)


def test_taps_out_of_range_say_so():
    encoder = three_layer_dinov3()
    with pytest.raises(ConfigError, match="between 0 and the encoder's 3 blocks"):
        dinov3_taps(encoder, torch.randn(1, 3, 64, 64), [1, 4])


def test_blocks_of_both_module_layouts():
    """4.x keeps the blocks at ``layer``, 5.x at ``model.layer``: both are found whichever
    version is installed; anything else is refused with a reason."""
    encoder = three_layer_dinov3()
    blocks = dinov3_blocks(encoder)
    assert isinstance(blocks, nn.ModuleList) and len(blocks) == 3
    layout_4x, layout_5x = nn.Module(), nn.Module()
    layout_4x.layer = blocks
    layout_5x.model = nn.Module()
    layout_5x.model.layer = blocks
    assert dinov3_blocks(layout_4x) is blocks and dinov3_blocks(layout_5x) is blocks
    with pytest.raises(ConfigError, match="no DINOv3 blocks"):
        dinov3_blocks(nn.Linear(2, 2))


@torch.no_grad()
def test_fusion_encodes_the_unnormed_last_tap():
    """The fusion model's cached features hold the last tap before the final norm, on every
    version (5.x's ``hidden_states[-1]``: what its checkpoints were trained on)."""
    model = build_model("tiny-fusion").eval()
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    features = model.encode_images(pixels)
    assert features.shape == (2, *model.image_feature_shape())
    last_tap = features[:, :model.level_sizes()[0]]
    expected = model.image_encoder(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(model.image_encoder.norm(last_tap), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-adapter", "tiny-fusion"])
def test_the_dinov3_architectures_build_and_run(preset):
    model = build_model(preset).eval()
    tokens = build_tokenizer(model.config)(["the red circle", "the blue square on the left"], padding=True,
                                           return_tensors="pt")
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    with torch.no_grad():
        out = model(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert out.boxes.shape == (2, 4) and torch.isfinite(out.boxes).all()


@torch.no_grad()
def test_adapter_runs_every_block_once():
    """The adapter splits DINOv3 at ``first_adapted``: with no adapters gating (tanh(0) = 0), the
    lower blocks then the upper ones give the encoder's own output."""
    model = build_model("tiny-adapter").eval()
    pixels = torch.randn(2, 3, model.config.image_size, model.config.image_size)
    lower, rope = model.encode_images(pixels)
    x = lower
    for block in dinov3_blocks(model.image_encoder)[model.first_adapted:]:
        x = block(x, position_embeddings=rope)
    expected = model.image_encoder(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(model.image_encoder.norm(x), expected, rtol=0, atol=1e-5)


def test_cache_keys_change_with_the_transformers_major_version(monkeypatch):
    """4.x and 5.x compute different features from the same weights: a cache built on one is
    not served to the other (the config's own ``transformers_version`` only says who saved it)."""
    config = get_config("tiny-fusion")
    image_encoder, text_encoder = load_encoder(config.image_encoder), load_encoder(config.text_encoder)
    tokenizer = load_tokenizer(config.text_encoder)
    keys = {}
    for version in ("4.56.2", "4.57.1", "5.25.0"):
        set_transformers_version(monkeypatch, version)
        keys[version] = (cache_key(config, image_encoder, {"layers": [1, 2]}),
                         text_cache_key(config, text_encoder, tokenizer))
    assert keys["4.56.2"] == keys["4.57.1"]  # minor versions share a cache
    assert keys["4.56.2"][0] != keys["5.25.0"][0] and keys["4.56.2"][1] != keys["5.25.0"][1]


def test_tiny_encoder_folder_names_the_transformers_major_version(monkeypatch, tmp_path):
    """Both majors load each other's saved tiny encoders, but from the same seed they draw
    different random weights: each major generates its own folder."""
    monkeypatch.setenv("FIFTYONE_GROUNDING_HOME", str(tmp_path))
    ours = tiny_encoder_dir("tiny:dinov3")
    set_transformers_version(monkeypatch, "5.0.0" if transformers_major() == 4 else "4.56.2")
    assert tiny_encoder_dir("tiny:dinov3").name != ours.name
