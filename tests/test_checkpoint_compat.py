"""Checkpoints of every preset saved before the per-architecture configs (flat ``config.json``,
``tests/data/checkpoints_v2/make_v2.py``) still load: the tiny ones give exactly the outputs they
gave then, the real ones rebuild the same config, state-dict names, shapes and parameter counts.
Their config written again (the nested form) reads back the same."""

import json
from pathlib import Path

import pytest
import torch

from fiftyone_grounding.models.build import build_model, build_tokenizer
from fiftyone_grounding.models.checkpoint import load_checkpoint
from fiftyone_grounding.models.config import GrounderConfig, get_config
from fiftyone_grounding.models.encoders import transformers_major
from fiftyone_grounding.errors import ConfigError

V2_CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints_v2"
PRESETS = sorted(p.name for p in V2_CHECKPOINTS.iterdir() if p.is_dir())
TINY = [p for p in PRESETS if p.startswith("tiny")]
REAL = [p for p in PRESETS if not p.startswith("tiny")]


def preset_when_saved(preset: str) -> GrounderConfig:
    """The preset as these checkpoints were trained: before the "judge" loss term (which trains the
    quality head on other boxes; the model, its weights and its outputs are the same)."""
    weights = {k: v for k, v in get_config(preset).loss_weights.items() if k != "judge"}
    return get_config(preset, loss_weights=weights)


def test_there_is_a_checkpoint_of_every_preset():
    from fiftyone_grounding.models.config import PRESETS as CURRENT

    assert set(PRESETS) == set(CURRENT)


@pytest.mark.parametrize("preset", TINY)
def test_a_tiny_checkpoint_gives_its_recorded_outputs(preset):
    folder = V2_CHECKPOINTS / preset
    expected = json.loads((folder / "expected.json").read_text())
    recorded = expected["outputs_by_transformers_major"][str(transformers_major())]
    model = load_checkpoint(folder)
    assert model.config == preset_when_saved(preset)
    g = torch.Generator().manual_seed(expected["pixels_seed"])
    pixels = torch.randn(*expected["pixels_shape"], generator=g)
    tok = build_tokenizer(model.config)(expected["phrases"], padding=True, return_tensors="pt")
    with torch.no_grad():  # one image per phrase, as make_v2.py gave them
        out = model(pixels[torch.tensor(expected["image_of_phrase"])], tok["input_ids"], tok["attention_mask"])
    for name, values in recorded.items():
        got = getattr(out, name)
        if values is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, torch.tensor(values), atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("preset", REAL)
def test_a_real_presets_config_rebuilds_its_model(preset):
    folder = V2_CHECKPOINTS / preset
    config = GrounderConfig.from_json(folder / "config.json")
    assert config == preset_when_saved(preset)
    recorded = json.loads((folder / "trainable_shapes.json").read_text())
    with torch.device("meta"):  # the shapes are the counts: nothing allocated or initialized
        model = build_model(config=config, weights=False)
    assert {k: list(v.shape) for k, v in model.trainable_state_dict().items()} == recorded["shapes"]
    assert model.num_parameters() == recorded["num_parameters"]
    assert model.num_parameters(trainable_only=True) == recorded["trainable"]


@pytest.mark.parametrize("preset", PRESETS)
def test_an_old_config_written_again_reads_back_the_same(preset, tmp_path):
    old = GrounderConfig.from_json(V2_CHECKPOINTS / preset / "config.json")
    old.to_json(tmp_path / "config.json")
    nested = json.loads((tmp_path / "config.json").read_text())
    assert isinstance(nested[old.architecture], dict)  # the architecture's settings, nested under its name
    assert GrounderConfig.from_json(tmp_path / "config.json") == old


def test_a_nested_config_refuses_another_architectures_setting_by_name():
    data = get_config("tiny-fusion").to_dict()
    with pytest.raises(ConfigError, match=r"\['norm_first'\] do nothing in the fusion architecture"):
        GrounderConfig.from_dict({**data, "norm_first": True})
    data["fusion"]["adapter_dim"] = 64
    with pytest.raises(ConfigError, match=r"\['adapter_dim'\] do nothing in the fusion architecture"):
        GrounderConfig.from_dict(data)
    # a flat key of its own architecture at the top level overrides the nested one
    assert GrounderConfig.from_dict({**get_config("tiny-fusion").to_dict(), "num_layers": 1}).arch.num_layers == 1
