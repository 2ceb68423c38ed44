"""Checkpoints of every preset as saved by 295be19 (before the per-architecture configs):
tiny presets with weights and their outputs on fixed inputs (per transformers major, whose tiny
encoders draw different weights), real presets as config.json + trainable shapes."""
import json, sys
from pathlib import Path
import torch
from fiftyone_grounding.config import PRESETS, get_config
from fiftyone_grounding.model import build_model, build_tokenizer
from fiftyone_grounding.checkpoint import save_checkpoint, load_checkpoint
from fiftyone_grounding.encoders import transformers_major

OUT = Path(sys.argv[1])
PHRASES = ["the large green square", "the red one on the right", "the circle"]
for preset in sorted(PRESETS):
    folder = OUT / preset
    if preset.startswith("tiny"):
        exp_file = folder / "expected.json"
        if not (folder / "model.safetensors").exists():
            torch.manual_seed(0)
            model = build_model(preset)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * 0.05)
            save_checkpoint(model, folder)
        model = load_checkpoint(folder)
        size = model.config.image_size
        g = torch.Generator().manual_seed(2)
        pixels = torch.randn(2, 3, size, size, generator=g)
        tok = build_tokenizer(model.config)(PHRASES, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(pixels.repeat_interleave(torch.tensor([2, 1]), 0), tok["input_ids"], tok["attention_mask"])
        outputs = {k: (v.tolist() if torch.is_tensor(v) else None) for k, v in out._asdict().items()
                   if torch.is_tensor(v) or v is None}
        expected = json.loads(exp_file.read_text()) if exp_file.exists() else {
            "pixels_seed": 2, "pixels_shape": [2, 3, size, size], "image_of_phrase": [0, 0, 1],
            "phrases": PHRASES, "outputs_by_transformers_major": {}}
        expected["outputs_by_transformers_major"][str(transformers_major())] = outputs
        exp_file.write_text(json.dumps(expected, indent=1))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        get_config(preset).to_json(folder / "config.json")
        with torch.device("meta"):
            model = build_model(preset, weights=False)
        shapes = {k: list(v.shape) for k, v in model.trainable_state_dict().items()}
        (folder / "trainable_shapes.json").write_text(json.dumps(
            {"num_parameters": model.num_parameters(), "trainable": model.num_parameters(trainable_only=True),
             "shapes": shapes}, indent=0))
    print(preset, "done")
