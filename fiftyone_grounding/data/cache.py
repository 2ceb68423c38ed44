"""Frozen image-feature cache on disk: encode each image once, reuse it every epoch.

The encoders are frozen, so their outputs are a pure function of (image, encoder,
resolution). Features are stored as float16 in memory-mapped ``.npy`` shards under a
folder keyed by encoder id + encoder config + encoder weights (SHA-256) + the transformers major
version + resolution + resize method + normalization: change any of those and a new folder is used
(the old one is never read).
New images are appended as new shards, so one cache serves runs on different subsets of a
dataset.

Augmentation: a small fixed set of views is cached per image, the image itself (view 0)
and its horizontal mirror (view 1), each encoded from real pixels (DINOv3's RoPE
features are not mirror-symmetric, so mirroring features would be wrong). Training picks
a view per image and epoch and mirrors boxes and swaps left/right in phrases with it.
Random crops cannot be cached; ``augment="scale+flip"`` trains without the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..devices import on_device
from ..models.encoders import home_dir, transformers_major
from ..models.precision import autocast
from ..errors import ImageError, TrainingError
from .images import RESIZE_METHOD, load_rgb, preprocess_image
from ..progress import bar

# 2: the key covers the encoder's weights too; 3: and the transformers major version and the resize
CACHE_VERSION = 3
VIEWS = ("original", "hflip")


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of the module's weights (names, shapes, dtypes, raw bytes): the same id and
    config with other weights (a random init, a fine-tuned copy in the same folder) gets
    another digest. Exact bytes, so it does not depend on the device or thread count."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def _key(encoder_name: str, encoder: torch.nn.Module, **more) -> str:
    """Digest of an encoder (id, config without volatile fields, weights, the transformers major
    version that runs it: 4.x and 5.x compute differently) and ``more``."""
    encoder_config = encoder.config.to_dict()
    encoder_config.pop("transformers_version", None)  # the version that saved it, not the one running
    encoder_config.pop("_name_or_path", None)
    payload = {"version": CACHE_VERSION, "encoder": encoder_name, "encoder_config": encoder_config,
               "encoder_weights": weights_fingerprint(encoder), "transformers": transformers_major(), **more}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(config, image_encoder, features: Optional[dict] = None) -> str:
    """Everything the cached image features depend on, hashed. ``features``: which of the
    encoder's outputs are cached (``GrounderBase.feature_spec``; None: its last hidden state)."""
    more = {"features": features} if features else {}
    return _key(
        config.image_encoder, image_encoder,
        image_size=config.image_size,
        resize=RESIZE_METHOD,
        mean=list(config.image_mean),
        std=list(config.image_std),
        views=list(VIEWS),
        **more,
    )


class _ImageViews(Dataset):
    """Both cached views of each image, resized and normalized like training."""

    def __init__(self, paths: Sequence[str], image_size: int, mean, std):
        self.paths = list(paths)
        self.image_size = image_size
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.paths[i])
        except ImageError as e:
            return i, None, str(e)
        x = preprocess_image(image, self.image_size, self.mean, self.std)  # (3, S, S)
        return i, torch.stack([x, x.flip(-1)]), None  # (2, 3, S, S): original, mirrored


def _collate(items):
    ok = [it for it in items if it[1] is not None]
    return ([it[0] for it in ok], torch.stack([it[1] for it in ok]) if ok else None,
            [(it[0], it[2]) for it in items if it[1] is None])


class _ShardedStore:
    """A folder of memory-mapped float16 ``.npy`` shards plus a JSON index, both replaced
    atomically, so a kill keeps every shard already indexed. Subclasses say what the index
    maps keys to and how rows are read."""

    shard_bytes = 256 * 2**20  # flush a shard at this size: memory bounded whatever the data

    def __init__(self, folder: Path):
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, list] = {}
        self._shards: dict[str, np.ndarray] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the index (after another process added entries)."""
        path = self.dir / "index.json"
        if path.exists():
            self._load_index(json.loads(path.read_text()))

    def _load_index(self, data) -> None:
        self._index = data

    def _index_data(self):
        return self._index

    def _save_index(self) -> None:
        tmp = self.dir / f"index.json.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(self._index_data()))
        os.replace(tmp, self.dir / "index.json")

    def _write_shard(self, arrays: list[np.ndarray]) -> str:
        name = f"shard-{uuid.uuid4().hex[:12]}.npy"
        tmp = self.dir / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(arrays))
        os.replace(tmp, self.dir / name)
        return name

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            self._shards[name] = np.load(self.dir / name, mmap_mode="r")
        return self._shards[name]

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __getstate__(self):  # DataLoader workers reopen the memory maps themselves
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state


class FeatureCache(_ShardedStore):
    """Memory-mapped frozen image features, one row per image, ``len(VIEWS)`` views per row."""

    def __init__(self, root: os.PathLike, key: str):
        self._errors: dict[str, str] = {}
        super().__init__(Path(root) / key)

    def _load_index(self, data) -> None:
        self._index = data.get("rows", {})
        self._errors = data.get("errors", {})

    def _index_data(self):
        return {"rows": self._index, "errors": self._errors}

    def error(self, path: str) -> Optional[str]:
        return self._errors.get(path)

    def nbytes_per_image(self) -> int:
        for name in {s for s, _ in self._index.values()}:
            shard = self._shard(name)
            return int(shard[0].nbytes)
        return 0

    def get(self, path: str, view: int) -> torch.Tensor:
        """(T, D) float16 features of ``path`` in view ``view`` (0: original, 1: mirrored)."""
        shard, row = self._index[path]
        return torch.from_numpy(np.array(self._shard(shard)[row, view]))

    # -- write ---------------------------------------------------------------------------

    @torch.no_grad()
    def build(self, paths: Sequence[str], encode: Callable[[torch.Tensor], torch.Tensor], config, device,
              batch_size: int = 64, num_workers: int = 0, autocast_dtype=None, progress: bool = True) -> int:
        """Encode every image of ``paths`` not cached yet (both views) with ``encode`` (pixels
        (n, 3, S, S) -> features (n, T, D), e.g. a model's ``encode_images``); returns how many."""
        # Images that failed before are tried again: the file may have been fixed since.
        todo = sorted({p for p in paths if p not in self._index})
        if not todo:
            return 0
        # the loader pins its batches for ``device``'s GPU (and its pin thread works there), not the current one
        with on_device(device):
            loader = DataLoader(_ImageViews(todo, config.image_size, config.image_mean, config.image_std),
                                batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                                pin_memory=torch.device(device).type == "cuda")
            pending: list[np.ndarray] = []
            pending_paths: list[str] = []
            count = 0
            for idx, views, errors in bar(loader, desc="caching image features", disable=not progress, leave=False):
                for i, why in errors:
                    self._errors[todo[i]] = why
                if views is None:
                    continue
                n = views.shape[0]
                pixels = views.flatten(0, 1).to(device, non_blocking=True)  # (2n, 3, S, S)
                with autocast(device, autocast_dtype):
                    feats = encode(pixels)  # (2n, T, D)
                feats = feats.float().reshape(n, len(VIEWS), *feats.shape[1:]).cpu().numpy()
                if not np.isfinite(feats).all() or np.abs(feats).max() > 6e4:
                    raise TrainingError("Image features overflow float16, so the feature cache cannot store them; "
                                        "train with cache_features=False")
                pending.append(feats.astype(np.float16))
                pending_paths.extend(todo[i] for i in idx)
                # Bounded memory: flush a shard every few hundred MB whatever the dataset size.
                if sum(a.nbytes for a in pending) >= self.shard_bytes:
                    count += self._flush(pending, pending_paths)
                    pending, pending_paths = [], []
            count += self._flush(pending, pending_paths)
            return count

    def _flush(self, arrays: list[np.ndarray], paths: list[str]) -> int:
        if arrays:
            name = self._write_shard(arrays)  # (N, V, T, D)
            for row, path in enumerate(paths):
                self._index[path] = [name, row]
                self._errors.pop(path, None)
        self._save_index()  # a kill keeps every shard already indexed
        return len(paths)


def default_feature_cache_dir() -> Path:
    """Where training caches frozen features (and search looks for them) when no ``cache_dir``
    is given: ``features/`` under the package's home folder."""
    return home_dir() / "features"


_MODEL_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its cache key


def model_cache_key(model) -> str:
    """The feature-cache key of a grounding model (a ``GrounderBase``), hashed once per model
    object (its encoder's weights are hashed: about a second for DINOv3 ViT-B)."""
    if model not in _MODEL_KEYS:
        _MODEL_KEYS[model] = cache_key(model.config, model.image_encoder, model.feature_spec())
    return _MODEL_KEYS[model]


def open_feature_cache(root: os.PathLike, model) -> FeatureCache:
    """The image-feature cache of a grounding model (a ``GrounderBase``) under ``root``."""
    return FeatureCache(root, model_cache_key(model))


def find_feature_cache(root: os.PathLike, model) -> Optional[FeatureCache]:
    """The model's image-feature cache under ``root`` if one was built (by training), else None
    (nothing is created); always None for an architecture whose image features depend on the
    phrase (``adapter``)."""
    if not model.cacheable:
        return None
    folder = Path(root) / model_cache_key(model)
    if not (folder / "index.json").is_file():
        return None
    return FeatureCache(root, folder.name)


# -- text features ---------------------------------------------------------------------------


def _vocab_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def text_cache_key(config, text_encoder, tokenizer) -> str:
    """Everything cached phrase features depend on, hashed."""
    return _key(
        config.text_encoder, text_encoder,
        vocab=_vocab_digest(tokenizer),
        lowercase=bool(getattr(tokenizer, "do_lower_case", False)),
        max_text_len=config.max_text_len,
    )


class TextFeatureCache(_ShardedStore):
    """Memory-mapped frozen text features, one variable-length (L, D) block per phrase.

    A shard holds the token rows of many phrases back to back (float16, ``(sum L, D)``);
    the index maps each phrase to (shard, first row, length). The phrases of a training
    set, and their left/right-swapped forms when flips are on, are encoded once.
    """

    def __init__(self, root: os.PathLike, key: str):
        super().__init__(Path(root) / "text" / key)

    def get(self, phrase: str) -> torch.Tensor:
        """(L, D) float16 features of ``phrase`` (tokens as the tokenizer cut them)."""
        name, start, length = self._index[phrase]
        return torch.from_numpy(np.array(self._shard(name)[start:start + length]))

    @torch.no_grad()
    def build(self, phrases: Sequence[str], model, tokenize, device, batch_size: int = 256,
              autocast_dtype=None, progress: bool = True) -> int:
        """Encode every phrase not cached yet with ``model.encode_text``; returns how many."""
        todo = sorted({p for p in phrases if p not in self._index})
        pending: list[np.ndarray] = []
        entries: list[tuple[str, int, int]] = []
        rows = 0
        for start in bar(range(0, len(todo), batch_size), desc="caching text features", disable=not progress,
                         leave=False):
            chunk = todo[start:start + batch_size]
            tokens = tokenize(chunk)
            mask = tokens["attention_mask"]
            with autocast(device, autocast_dtype):
                feats = model.encode_text(tokens["input_ids"].to(device), mask.to(device))  # (B, L, D)
            feats = feats.float().cpu().numpy()
            blocks = []
            for phrase, f, n in zip(chunk, feats, mask.sum(1).tolist()):
                blocks.append(f[:n].astype(np.float16))
                entries.append((phrase, rows, n))
                rows += n
            pending.append(np.concatenate(blocks))  # one array per chunk: the size check below stays cheap
            if sum(a.nbytes for a in pending) >= self.shard_bytes:
                self._flush(pending, entries)
                pending, entries, rows = [], [], 0
        self._flush(pending, entries)
        return len(todo)

    def _flush(self, arrays: list[np.ndarray], entries: list[tuple[str, int, int]]) -> None:
        if arrays:
            name = self._write_shard(arrays)  # (sum L, D)
            for phrase, start, length in entries:
                self._index[phrase] = [name, start, length]
        self._save_index()


def open_text_cache(root: os.PathLike, config, text_encoder, tokenizer) -> TextFeatureCache:
    return TextFeatureCache(root, text_cache_key(config, text_encoder, tokenizer))
