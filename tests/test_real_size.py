"""The four architectures at their real size on the CPU, and each in bf16.

Real size: DINOv3 ViT-B/16 and BGE-small built from their real configs with random weights
(nothing can be downloaded here), saved and loaded back through ``from_pretrained`` as a Hub id
would be, each preset at its real resolution (224 px for ``grounder``, 384 px for the v2
presets): a 640x480 image and two phrases through the data path, forward, loss, backward, an
optimizer step, save, load and apply. What the tiny presets cannot show: the real token counts,
patch grid, register tokens, widths and layer numbers that the presets' taps and adapters name.

bf16: a training step under bf16 autocast and ``predict_boxes`` with bf16 on the CPU, for the
tiny twin of each architecture.
"""

import string

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fiftyone_grounding.models.checkpoint import load_checkpoint, save_checkpoint
from fiftyone_grounding.models.config import get_config
from fiftyone_grounding.models.encoder_specs import BGE_SMALL, DINOV3_VITB16, KNOWN_ENCODER_CONFIGS
from fiftyone_grounding.data.records import GroundingRecords
from fiftyone_grounding.data.batching import Collator
from fiftyone_grounding.data.datasets import GroundingDataset
from fiftyone_grounding.models.encoders import SPECIAL_TOKENS, _config_from_dict, _model_classes
from fiftyone_grounding.inference.model import GroundingModel
from fiftyone_grounding.models.build import build_model, build_tokenizer
from fiftyone_grounding.engine.loop import train_step
from fiftyone_grounding.engine.optim import configure_optimizer

PHRASES = ["the red square on the left", "the blue circle"]
BOXES = [[0.1, 0.3, 0.35, 0.7], [0.6, 0.2, 0.9, 0.6]]  # normalized xyxy of what the image shows


@pytest.fixture(scope="module")
def real_encoders(tmp_path_factory):
    """Folders holding DINOv3 ViT-B/16 and BGE-small (their real configs, random weights) and a
    WordPiece tokenizer with BGE's vocabulary size, as ``from_pretrained`` reads a Hub download."""
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("real_encoders")
    folders = {}
    for name, key in ((DINOV3_VITB16, "image_encoder"), (BGE_SMALL, "text_encoder")):
        config = dict(KNOWN_ENCODER_CONFIGS[name])
        torch.manual_seed(0)
        model = _model_classes(config["model_type"])[1](_config_from_dict(config))
        folder = root / key
        model.save_pretrained(folder)
        folders[key] = str(folder)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = SPECIAL_TOKENS + chars + ["##" + c for c in string.ascii_lowercase]
    vocab = words + [f"[unused{i}]" for i in range(KNOWN_ENCODER_CONFIGS[BGE_SMALL]["vocab_size"] - len(words))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(root / "vocab.txt"), do_lower_case=True, model_max_length=512).save_pretrained(
        folders["text_encoder"])
    return folders


@pytest.fixture(scope="module")
def image_640x480(tmp_path_factory):
    image = Image.new("RGB", (640, 480), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    draw.rectangle([64, 144, 224, 336], fill=(220, 40, 40))
    draw.ellipse([384, 96, 576, 288], fill=(40, 80, 230))
    path = tmp_path_factory.mktemp("img") / "scene.jpg"
    image.save(path, quality=92)
    return str(path)


def _records(path: str, several: bool) -> GroundingRecords:
    return GroundingRecords(sample_ids=["a", "b"], filepaths=[path, path], phrases=list(PHRASES),
                            boxes=[list(b) for b in BOXES], targets=[[b] for b in BOXES] if several else None)


def _one_batch(model, path: str) -> dict:
    cfg = model.config
    items = GroundingDataset(_records(path, cfg.num_queries > 0), cfg.image_size, cfg.image_mean, cfg.image_std)
    assert len(items) == 1  # both phrases of the image in one item: the image is encoded once
    return Collator(build_tokenizer(cfg), cfg.max_text_len)([items[0]])


@pytest.mark.parametrize("preset, tokens", [("grounder", 5 + 14 * 14), ("fusion", 5 + 24 * 24 + 3 * 12 * 12),
                                            ("fusion-multi", 5 + 24 * 24 + 3 * 12 * 12), ("adapter", None)])
def test_each_architecture_at_its_real_size(preset, tokens, real_encoders, image_640x480, tmp_path, dataset_name):
    import fiftyone as fo

    from fiftyone_grounding.inference.apply import apply_grounding_model

    config = get_config(preset, **real_encoders)
    model = build_model(config=config)  # through from_pretrained, from the folders
    assert model.image_encoder.config.hidden_size == 768 and model.text_encoder.config.hidden_size == 384
    batch = _one_batch(model, image_640x480)
    assert batch["pixel_values"].shape == (1, 3, config.image_size, config.image_size)
    encoded = []  # what the step's image encoding gives (read on its way: ViT-B at 384 px runs once)
    if tokens is not None:  # the cacheable features: the last tap whole, the earlier ones pooled 2x2
        assert model.image_feature_shape() == (tokens, 768)

        def encode_images(pixel_values, _encode=model.encode_images):
            features = _encode(pixel_values)
            encoded.append(tuple(features.shape))
            return features
        model.encode_images = encode_images
    model.init_box_bias(torch.tensor(BOXES).mean(0))
    model.train()
    optimizer = configure_optimizer(model, lr=1e-4, weight_decay=1e-4)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    loss, pred = train_step(model, batch, optimizer, config.loss_weights, grad_clip=1.0)
    if tokens is not None:
        del model.encode_images
        assert encoded == [(1, tokens, 768)]
    assert torch.isfinite(loss) and pred.shape == (2, 4)
    after = model.trainable_state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert len(reached) > 20 and reached <= moved  # every weight the loss reached took the step
    assert all(p.grad is None for p in model.image_encoder.parameters())  # the encoders stay frozen
    assert all(p.grad is None for p in model.text_encoder.parameters())

    folder = save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(folder)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, loaded.trainable_state_dict()[k]), k

    ds = fo.Dataset(dataset_name)
    ds.add_samples([fo.Sample(filepath=image_640x480, expression=p) for p in PHRASES])
    apply_grounding_model(ds, GroundingModel(loaded, device="cpu"), label_field="predictions",
                          prompt_field="expression")
    boxes = ds.values("predictions.detections.bounding_box")
    if not config.num_queries:  # (a multi-box model writes the boxes at or above its threshold: any number)
        assert all(b is not None and len(b) == 1 for b in boxes)
    for sample_boxes in boxes:  # every box inside the image
        for x, y, w, h in sample_boxes or []:
            assert 0 <= x <= 1 and 0 <= y <= 1 and 0 < w <= 1 - x + 1e-6 and 0 < h <= 1 - y + 1e-6


@pytest.mark.parametrize("preset", ["tiny", "tiny-fusion", "tiny-fusion-multi", "tiny-adapter"])
def test_each_architecture_trains_and_predicts_in_bf16_on_the_cpu(preset, image_640x480):
    torch.manual_seed(0)
    model = build_model(preset).train()
    batch = _one_batch(model, image_640x480)
    optimizer = configure_optimizer(model, lr=1e-3, weight_decay=1e-4)
    losses = [train_step(model, batch, optimizer, model.config.loss_weights, grad_clip=1.0,
                         autocast_dtype=torch.bfloat16)[0].item() for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32

    bf16 = GroundingModel(model, device="cpu", mixed_precision="bf16")
    fp32 = GroundingModel(model, device="cpu", mixed_precision="no")
    assert bf16.autocast_dtype == torch.bfloat16
    pixels = batch["pixel_values"]
    a = bf16.predict_boxes(pixels, PHRASES, torch.zeros(2, dtype=torch.long)).result()
    b = fp32.predict_boxes(pixels, PHRASES, torch.zeros(2, dtype=torch.long)).result()
    assert a.boxes.dtype == torch.float32 and torch.isfinite(a.boxes).all()
    assert ((a.boxes >= 0) & (a.boxes <= 1)).all()
    assert torch.allclose(a.boxes, b.boxes, atol=0.05)  # bf16 keeps about 3 digits
