"""FiftyOne view -> torch Dataset / DataLoader for grounding.

Items are *images*, each with all of its phrases and boxes, so an image shared by
several referring expressions is decoded, augmented and encoded once per batch.
Transforms take and return image, boxes and phrases together (detr's
``datasets/transforms.py``): a horizontal flip swaps "left" and "right" in the phrases.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from .boxes import fiftyone_xywh_to_xyxy, is_valid_xyxy

logger = logging.getLogger(__name__)

# albumentations looks for a newer version of itself over the network when imported; this
# package works offline, and each DataLoader worker would ask again.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Whole words only: "bright" and "leftover" stay as they are (TransVG's str.replace
# turned "bright" into "bleft").
_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}

# Decompression-bomb guard: huge images are refused with a reason, not loaded.
MAX_IMAGE_PIXELS = 178_956_970


def swap_left_right(phrase: str) -> str:
    """Swap the whole words left/right (and leftmost/rightmost), keeping their case."""

    def repl(m: re.Match) -> str:
        word = m.group(1)
        new = _SWAP[word.lower()]
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + (m.group(2) or "")

    return _LEFT_RIGHT.sub(repl, phrase)


def hflip_boxes(boxes_xyxy: np.ndarray) -> np.ndarray:
    """Mirror normalized xyxy boxes (N, 4) left-right."""
    boxes = boxes_xyxy.copy()
    boxes[:, [0, 2]] = 1.0 - boxes_xyxy[:, [2, 0]]
    return boxes


def hflip(image: np.ndarray, boxes_xyxy: np.ndarray, phrases: Sequence[str]):
    """Horizontal flip of an (H, W, C) image, its normalized xyxy boxes and phrases."""
    image = np.ascontiguousarray(image[:, ::-1])
    return image, hflip_boxes(boxes_xyxy), [swap_left_right(p) for p in phrases]


def load_rgb(path: str) -> np.ndarray:
    """Decode an image as (H, W, 3) uint8 RGB, honouring EXIF rotation.

    Grayscale, palette, RGBA and 16-bit images are converted; a missing, unreadable or
    too large file raises ``ValueError`` with the reason (the callers skip the sample).
    """
    try:
        with Image.open(path) as im:
            # Only the header is read so far: a decompression bomb is refused before decoding
            # (PIL's own guard is a global that other libraries sometimes switch off).
            width, height = im.size
            if width * height <= MAX_IMAGE_PIXELS:
                return _to_rgb(im)
    except FileNotFoundError:
        raise ValueError("image file not found") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"image too large ({e})") from None
    except Exception as e:  # untrusted files fail in many ways: OSError, SyntaxError, struct.error, ...
        raise ValueError(f"cannot decode image ({type(e).__name__}: {e})") from None
    raise ValueError(f"image too large ({width}x{height} pixels, the limit is {MAX_IMAGE_PIXELS:,})")


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


def resize_rgb(image: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (S, S, 3) uint8: the resize of training and inference.

    The function ``A.Resize(S, S)`` applies (bilinear), called directly: building the
    transform for every image costs 80 us of Python, held under the GIL by decoding threads.
    """
    import cv2
    from albumentations.augmentations.geometric import functional as fgeometric

    return fgeometric.resize(image, (image_size, image_size), interpolation=cv2.INTER_LINEAR)


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


@dataclass
class GroundingRecords:
    """The rows of a view that can be trained on, and why the others were skipped."""

    sample_ids: list[str] = field(default_factory=list)
    filepaths: list[str] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)  # normalized xyxy
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id, reason)

    def __len__(self) -> int:
        return len(self.sample_ids)


NO_PHRASE = "missing or empty phrase"  # why a sample without a usable phrase is skipped


def clean_phrase(phrase) -> Optional[str]:
    """Whitespace-normalized phrase, or None when missing or empty."""
    if not isinstance(phrase, str):
        return None
    phrase = " ".join(phrase.split())
    return phrase or None


def read_records(view, phrase_field: str = "expression", gt_field: str = "ground_truth") -> GroundingRecords:
    """Bulk-read (id, filepath, phrase, first box) from a FiftyOne view, validating each row."""
    for name in (phrase_field, gt_field):
        if not view.has_field(name):
            raise ValueError(f"The dataset has no field {name!r}; fields: {sorted(view.get_field_schema())}")
    ids, paths, phrases, bbs = view.values(
        ["id", "filepath", phrase_field, f"{gt_field}.detections.bounding_box"]
    )
    records = GroundingRecords()
    for sid, path, phrase, boxes in zip(ids, paths, phrases, bbs):
        text = clean_phrase(phrase)
        if text is None:
            records.skipped.append((sid, NO_PHRASE))
            continue
        if not boxes:
            records.skipped.append((sid, f"no box in {gt_field!r}"))
            continue
        box = fiftyone_xywh_to_xyxy(boxes[0]) if len(boxes[0]) == 4 else [math.nan] * 4
        if not all(math.isfinite(v) for v in box):
            records.skipped.append((sid, "box has non-finite coordinates"))
            continue
        box = [min(max(v, 0.0), 1.0) for v in box]  # partly outside the image: clipped
        if not is_valid_xyxy(box):
            records.skipped.append((sid, "box has zero or negative area"))
            continue
        records.sample_ids.append(sid)
        records.filepaths.append(path)
        records.phrases.append(text)
        records.boxes.append(box)
    return records


def build_transform(image_size: int, crop: bool = False):
    """Albumentations pipeline: optional box-safe crop, then resize to a square."""
    import albumentations as A

    ops = [A.BBoxSafeRandomCrop(erosion_rate=0.0, p=0.5)] if crop else []
    ops.append(A.Resize(image_size, image_size))
    return A.Compose(ops, bbox_params=A.BboxParams(format="albumentations", label_fields=["indices"],
                                                   clip=True, min_area=0.0, min_visibility=0.0))


class GroundingDataset(Dataset):
    """One item per image (or per chunk of an image's phrases).

    Returns ``dict(pixel_values (3, S, S) float, boxes (k, 4), phrases [k], sample_ids [k])``,
    or ``dict(skipped=[(sample_id, reason), ...])`` when the image cannot be read. With a
    ``feature_cache`` (see ``cache.py``) it returns cached ``image_features (T, D)`` of the
    original or mirrored view instead of pixels.
    """

    def __init__(
        self,
        records: GroundingRecords,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: str = "none",  # "none" | "flip" | "crop-flip"
        max_phrases_per_image: int = 32,
        seed: int = 0,
        feature_cache=None,
    ):
        if augment not in ("none", "flip", "crop-flip"):
            raise ValueError("augment must be 'none', 'flip' or 'crop-flip'")
        self.records = records
        self.image_size = image_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.augment = augment
        self.transform = build_transform(image_size, crop=augment == "crop-flip")
        self.seed = seed
        self.epoch = 0
        if feature_cache is not None and augment == "crop-flip":
            raise ValueError("Cached features support augment='none' or 'flip' only")
        self.feature_cache = feature_cache
        by_image: dict[str, list[int]] = {}
        for i, path in enumerate(records.filepaths):
            by_image.setdefault(path, []).append(i)
        self.groups: list[list[int]] = []
        for indices in by_image.values():
            for start in range(0, len(indices), max_phrases_per_image):
                self.groups.append(indices[start:start + max_phrases_per_image])

    def __len__(self) -> int:
        return len(self.groups)

    def group_sizes(self) -> list[int]:
        return [len(g) for g in self.groups]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index) -> dict:
        """``index``: an item number, or ``(epoch, item number)`` from a sampler that tags its
        batches with the epoch (``GroupBatchSampler(tag_epoch=True)``): persistent DataLoader
        workers hold a copy of this dataset made before ``set_epoch``, so the epoch must
        travel with the index."""
        epoch = self.epoch
        if isinstance(index, tuple):
            epoch, index = index
        rows = self.groups[index]
        r = self.records
        ids = [r.sample_ids[i] for i in rows]
        if self.feature_cache is not None:
            return self._cached_item(index, rows, ids, epoch)
        try:
            image = load_rgb(r.filepaths[rows[0]])
        except ValueError as e:
            return {"skipped": [(sid, str(e)) for sid in ids]}
        boxes = np.asarray([r.boxes[i] for i in rows], dtype=np.float32)
        phrases = [r.phrases[i] for i in rows]
        # Per-item randomness from (seed, epoch, index): the same augmentation whatever
        # the number of workers or processes, so a resumed run repeats itself exactly.
        rng = np.random.default_rng([self.seed, epoch, index])
        self.transform.set_random_seed(int(rng.integers(2**31)))
        out = self.transform(image=image, bboxes=boxes, indices=list(range(len(rows))))
        image, boxes = out["image"], np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        if len(boxes) != len(rows):  # a crop never drops boxes, but be safe
            return {"skipped": [(sid, "box lost in augmentation") for sid in ids]}
        if self.augment != "none" and rng.random() < 0.5:
            image, boxes, phrases = hflip(image, boxes, phrases)
        return {
            "pixel_values": normalize_pixels(image, self.mean, self.std),  # (3, S, S)
            "boxes": torch.from_numpy(boxes),  # (k, 4)
            "phrases": phrases,
            "sample_ids": ids,
        }


    def _cached_item(self, index: int, rows: list[int], ids: list[str], epoch: int) -> dict:
        r = self.records
        path = r.filepaths[rows[0]]
        error = self.feature_cache.error(path)
        if error is not None or path not in self.feature_cache:
            return {"skipped": [(sid, error or "image not in the feature cache") for sid in ids]}
        boxes = np.asarray([r.boxes[i] for i in rows], dtype=np.float32)
        phrases = [r.phrases[i] for i in rows]
        rng = np.random.default_rng([self.seed, epoch, index])
        view = int(self.augment != "none" and rng.random() < 0.5)
        if view:  # the mirrored view was encoded from mirrored pixels
            boxes, phrases = hflip_boxes(boxes), [swap_left_right(p) for p in phrases]
        return {
            "image_features": self.feature_cache.get(path, view),  # (T, D) float16
            "boxes": torch.from_numpy(boxes),
            "phrases": phrases,
            "sample_ids": ids,
        }


def default_apply_batch_size(device: torch.device) -> int:
    """Phrases per forward pass when applying a model and the caller gives none: 256 on a
    GPU (the host's cost per batch is then small against the GPU's work; the speed figures
    are measured at 256), 64 on the CPU (larger batches gain nothing there)."""
    return 256 if torch.device(device).type == "cuda" else 64


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers when the caller gives none: on a GPU, up to 8 processes decode (or
    read cached features) beside it; on the CPU the model already uses every core, so items
    are loaded in the main process."""
    return min(8, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


class GroupBatchSampler(Sampler[list[int]]):
    """Packs image groups into batches of at most ``batch_size`` phrases.

    Shuffled per epoch with ``(seed, epoch)``, so every process of a distributed run and
    every resumed run sees the same order. With ``num_replicas > 1`` each process takes
    every ``num_replicas``-th batch; when ``pad`` is set the batch list is first padded
    (by repeating its start) so that all processes run the same number of steps, which
    data-parallel training needs.
    """

    def __init__(self, group_sizes: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, pad: bool = True, tag_epoch: bool = False):
        self.group_sizes = list(group_sizes)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.pad = pad
        self.tag_epoch = tag_epoch  # yield (epoch, group) pairs, for persistent workers
        self.epoch = 0
        self._batches = self._pack()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._batches = self._pack()

    def _pack(self) -> list[list[int]]:
        order = np.arange(len(self.group_sizes))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        batches, current, count = [], [], 0
        for g in order.tolist():
            size = self.group_sizes[g]
            if current and count + size > self.batch_size:
                batches.append(current)
                current, count = [], 0
            current.append(g)
            count += size
        if current:
            batches.append(current)
        if self.num_replicas > 1:
            if self.pad and batches and len(batches) % self.num_replicas:
                extra = self.num_replicas - len(batches) % self.num_replicas
                batches += (batches * extra)[:extra]
            batches = batches[self.rank::self.num_replicas]
        return batches

    def __iter__(self) -> Iterator[list]:
        if self.tag_epoch:
            return iter([[(self.epoch, g) for g in batch] for batch in self._batches])
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


class PhraseTokenizer:
    """Phrases -> padded token ids of at most ``max_len`` tokens.

    Longer phrases are cut to the encoder's limit; the first time that happens this
    instance logs one warning (one per training run or ``apply_model`` call, not per batch).
    """

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.warned = False

    def __call__(self, phrases: Sequence[str]):
        tokens = self.tokenizer(list(phrases), padding=True, truncation=True, max_length=self.max_len,
                                return_tensors="pt")
        if not self.warned:
            # Fast tokenizers keep what truncation removed; slow ones cannot tell.
            cut = [p for p, enc in zip(phrases, tokens.encodings or []) if enc.overflowing]
            if cut:
                self.warned = True
                logger.warning(
                    "%d phrase(s) are longer than the text encoder's limit of %d tokens and were cut to "
                    "it, e.g. %r. Shorten them to use all of the text (this warning is shown once per run).",
                    len(cut), self.max_len, cut[0][:80] + ("..." if len(cut[0]) > 80 else ""))
        return tokens


class Collator:
    """Stacks images once, tokenizes phrases (or reads their cached text features), and maps
    each phrase to its image."""

    def __init__(self, tokenizer, max_text_len: int, text_cache=None):
        self.tokenize = PhraseTokenizer(tokenizer, max_text_len)
        self.text_cache = text_cache

    def __call__(self, items: list[dict]) -> dict:
        skipped = [s for it in items for s in it.get("skipped", [])]
        items = [it for it in items if "skipped" not in it]
        batch = {"skipped": skipped, "sample_ids": [s for it in items for s in it["sample_ids"]]}
        if not items:
            return batch
        phrases = [p for it in items for p in it["phrases"]]
        if self.text_cache is not None:
            feats = [self.text_cache.get(p) for p in phrases]  # (L_i, D) each
            text = {"text_features": torch.nn.utils.rnn.pad_sequence(feats, batch_first=True),  # (B, L, D)
                    "attention_mask": torch.nn.utils.rnn.pad_sequence(
                        [torch.ones(len(f), dtype=torch.long) for f in feats], batch_first=True)}
        else:
            tokens = self.tokenize(phrases)
            text = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        image_key = "image_features" if "image_features" in items[0] else "pixel_values"
        batch.update(
            # (I, 3, S, S) pixels, or (I, T, D) cached features
            **{image_key: torch.stack([it[image_key] for it in items])},
            image_index=torch.cat([torch.full((len(it["phrases"]),), i, dtype=torch.long)
                                   for i, it in enumerate(items)]),  # (B,)
            boxes=torch.cat([it["boxes"] for it in items]),  # (B, 4)
            phrases=phrases,
            **text,
        )
        return batch
