"""The resize and normalization of every path (training, feature cache, inference) are the DINOv3
image processor's: bilinear with antialiasing, then ImageNet mean/std."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as tvF

from fiftyone_grounding.data import cache
from fiftyone_grounding.models.config import get_config
from fiftyone_grounding.models.encoders import load_encoder
from fiftyone_grounding.data.images import preprocess_image, resize_rgb


def detailed_photo(width: int = 640, height: int = 480) -> np.ndarray:
    """A drawn (H, W, 3) uint8 image with detail finer than the target grid: 1-pixel stripes, a
    fine checkerboard, thin lines and rings, over a smooth gradient."""
    yy, xx = np.mgrid[:height, :width]
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], -1)
    image = image.astype(np.uint8)
    image[:, : width // 3][:, ::2] = 255  # 1-pixel vertical stripes on the left third
    checker = ((xx + yy) % 2 == 0)[height // 2:, width // 3: 2 * width // 3]
    image[height // 2:, width // 3: 2 * width // 3][checker] = (0, 0, 0)  # 1-pixel checkerboard
    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    cx, cy = 5 * width // 6, height // 4
    for r in range(2, min(width // 6, height // 4), 3):  # thin rings, top right
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(255, 0, 0))
    for i in range(0, height // 2, 3):  # thin lines fanning out, bottom right
        draw.line([2 * width // 3, height // 2 + i, width - 1, height - 1 - i], fill=(0, 0, 255))
    return np.asarray(im).copy()


def torchvision_resize(image: np.ndarray, size: int, antialias: bool) -> np.ndarray:
    return tvF.resize(torch.from_numpy(image).permute(2, 0, 1), [size, size], antialias=antialias).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("size", [224, 384])
def test_resize_is_antialiased_bilinear(size):
    image = detailed_photo()
    ours = resize_rgb(image, size).astype(int)
    assert ours.shape == (size, size, 3)
    assert np.abs(ours - torchvision_resize(image, size, antialias=True)).max() <= 1
    # a plain bilinear shrink skips pixels: the stripes and the checkerboard come out aliased
    aliased = np.abs(ours - torchvision_resize(image, size, antialias=False))
    assert aliased.mean() > 10 and aliased.max() > 100


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (1000, 300)])
def test_resize_up_and_down_any_shape(shape):
    """Upscaling (no antialiasing to do), the same size, and tall images: still torchvision's."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for size in (64, 224):
        ours = resize_rgb(image, size)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        assert np.abs(ours.astype(int) - torchvision_resize(image, size, antialias=True)).max() <= 1


def test_resize_takes_read_only_and_strided_arrays():
    image = detailed_photo(160, 120)
    expected = resize_rgb(image, 64)
    read_only = image.copy()
    read_only.setflags(write=False)
    assert np.array_equal(resize_rgb(read_only, 64), expected)
    padded = np.zeros((120, 160, 4), np.uint8)
    padded[..., :3] = image
    assert np.array_equal(resize_rgb(padded[..., :3], 64), expected)  # not contiguous


def dinov3_processor(size: int):
    """DINOv3's image processor (the torchvision one), built from its class: no download."""
    try:  # transformers 5.x: the torchvision backend is the class itself
        from transformers.models.dinov3_vit.image_processing_dinov3_vit import DINOv3ViTImageProcessor as cls
    except ImportError:  # 4.x: the "fast" processor
        from transformers.models.dinov3_vit.image_processing_dinov3_vit_fast import DINOv3ViTImageProcessorFast as cls
    return cls(size={"height": size, "width": size})


@pytest.mark.parametrize("size", [224, 384])
def test_preprocessing_is_the_dinov3_image_processors(size):
    """Its defaults are ours (bilinear, antialiased, x/255, ImageNet mean/std). It resizes floats
    where we resize uint8 (torchvision's fixed-point kernel, rounded: a quarter of the bytes
    between workers), so values differ by at most a grey level over std: 1 / 255 / 0.224 = 0.018."""
    config = get_config("fusion")
    processor = dinov3_processor(size)
    assert tuple(processor.image_mean) == tuple(config.image_mean)
    assert tuple(processor.image_std) == tuple(config.image_std)
    assert processor.do_rescale and processor.rescale_factor == pytest.approx(1 / 255)
    image = detailed_photo()
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]  # (3, S, S)
    ours = preprocess_image(image, size, config.image_mean, config.image_std)
    assert ours.shape == expected.shape == (3, size, size)
    grey_level = 1 / 255 / min(config.image_std)
    torch.testing.assert_close(ours, expected, rtol=0, atol=grey_level + 1e-4)
    assert (ours - expected).abs().mean() < 0.35 * grey_level  # rounding to uint8: a quarter on average


def test_cache_key_names_the_resize(monkeypatch):
    """Features cached under another resize are never served."""
    config = get_config("tiny")
    encoder = load_encoder(config.image_encoder)
    before = cache.cache_key(config, encoder)
    monkeypatch.setattr(cache, "RESIZE_METHOD", "bilinear")
    assert cache.cache_key(config, encoder) != before
