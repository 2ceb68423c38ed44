"""The one image loader, and the resize and normalization that training and inference share.

``load_rgb`` is the only function that opens image files: training (with or without the
feature cache), ``apply_model``, the fast apply path and ``predict`` all use it, so every path
sees the same pixels (EXIF rotation applied, modes converted, decompression bombs refused).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ImageError

# Decompression-bomb guard: huge images are refused with a reason, not loaded.
MAX_IMAGE_PIXELS = 178_956_970


def load_rgb(path: str) -> np.ndarray:
    """Decode an image as (H, W, 3) uint8 RGB, honouring EXIF rotation.

    Grayscale, palette, RGBA and 16-bit images are converted; a missing, unreadable or
    too large file raises ``ImageError`` with the reason (the callers skip the sample).
    """
    try:
        with Image.open(path) as im:
            # Only the header is read so far: a decompression bomb is refused before decoding
            # (PIL's own guard is a global that other libraries sometimes switch off).
            width, height = im.size
            if width * height <= MAX_IMAGE_PIXELS:
                return _to_rgb(im)
    except FileNotFoundError:
        raise ImageError("image file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large ({e})") from None
    except Exception as e:  # untrusted files fail in many ways: OSError, SyntaxError, struct.error, ...
        raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
    raise ImageError(f"image too large ({width}x{height} pixels, the limit is {MAX_IMAGE_PIXELS:,})")


def _to_rgb(im: Image.Image) -> np.ndarray:
    im = ImageOps.exif_transpose(im)  # pixels as the user sees them (phone photos)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        # "I;16*" is always 16-bit; "I" (32-bit ints) may hold 8-bit values.
        scale = 255.0 if im.mode == "I" and arr.max() <= 255 else 65535.0
        im = Image.fromarray((arr / scale * 255.0).round().clip(0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB"))


def normalize_pixels(image: np.ndarray, mean, std) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 tensor normalized with ``mean``/``std``."""
    return normalize_pixels_batch(rgb_tensor(image)[None], mean, std)[0]


def rgb_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> uint8 tensor (sharing its memory when it is writable)."""
    return torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else image.copy())


# What resize_rgb does, named in the feature-cache key: features cached under another resize are
# not served.
RESIZE_METHOD = "bilinear-antialias"


def resize_rgb(image: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (S, S, 3) uint8: the resize of training and inference.

    Bilinear with antialiasing, as the DINOv3 image processor resizes (torchvision's
    ``resize(..., antialias=True)``): a plain bilinear shrink of a 640 x 480 photo to 384 or 224
    skips pixels and aliases fine detail. torchvision's uint8 kernel, called directly on a view
    of the array (no float copy, no transform object per image; it releases the GIL).
    """
    from torchvision.transforms.v2.functional import resize_image

    pixels = rgb_tensor(image).permute(2, 0, 1)  # (3, H, W) view, channels-last strides
    return resize_image(pixels, [image_size, image_size], antialias=True).permute(1, 2, 0).numpy()


def preprocess_image(image: np.ndarray, image_size: int, mean, std) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, S, S) model input: the resize and normalization of training."""
    return normalize_pixels(resize_rgb(image, image_size), mean, std)


def normalize_pixels_batch(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 normalized with ``mean``/``std``, on the
    tensor's device (inference sends uint8 to the GPU: a quarter of the bytes)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t, std_t = _mean_std(tuple(mean), tuple(std), x.device)
    return x.sub_(mean_t).div_(std_t).contiguous()


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) float32 mean and std on ``device``, made once: copying them to a GPU for
    every batch would wait for the batch still running there."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))


def resized_pixels(path: str, image_size: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(resized uint8 (S, S, 3) image, None) for an image file, or (None, why it cannot be read).

    Inference items carry uint8 pixels (a quarter of the bytes of float32 between workers,
    pinned memory and the GPU); the model normalizes them on its device.
    """
    try:
        return rgb_tensor(resize_rgb(load_rgb(path), image_size)), None
    except ImageError as e:
        return None, str(e)
