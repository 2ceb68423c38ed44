"""The frozen-feature caches of a run: whether its image features can be cached, and encoding
every image and phrase it will see once into the on-disk caches (``data/cache.py``), the main
process first and the others reusing what it wrote."""

from __future__ import annotations

from ..data.augment import CACHEABLE, parse_augment
from ..data.cache import VIEWS, default_feature_cache_dir, open_feature_cache, open_text_cache
from ..data.text import swap_left_right
from ..models.decoder import Grounder
from ..models.precision import AUTOCAST_DTYPES
from .config import TrainConfig


def cache_fits(model: Grounder, cfg: TrainConfig, num_images: int, say: bool) -> bool:
    """Whether the image features of this run can be cached: the architecture's are
    text-independent, the augmentation needs no pixels, and they fit ``cache_budget_gb``."""

    def note(message: str) -> bool:
        if say:
            print(f"Feature cache off: {message}; the images are encoded on the fly, once per image of each batch")
        return False

    if not model.cacheable:
        return note(f"the {model.config.architecture} architecture reads the phrase inside the image encoder")
    if not parse_augment(cfg.augment) <= CACHEABLE:
        return note(f"augment={cfg.augment!r} needs pixels (only flip comes from the cache)")
    tokens, width = model.image_feature_shape()
    per_image = tokens * width * 2 * len(VIEWS)  # float16, both views
    if per_image * num_images > cfg.cache_budget_gb * 2**30:
        return note(f"{num_images:,} images x {per_image / 2**20:.1f} MiB ({tokens} tokens x {width}, float16, "
                    f"2 views) = {per_image * num_images / 2**30:.1f} GiB is over "
                    f"cache_budget_gb={cfg.cache_budget_gb:g}")
    return True


def build_feature_cache(model: Grounder, accelerator, mp: str, cache_dir, paths: list[str], num_workers: int,
                        show_progress: bool):
    """Encode every image once into the on-disk cache (main process first, others reuse it)."""
    cache = open_feature_cache(cache_dir or default_feature_cache_dir(), model)
    with accelerator.main_process_first():
        cache.reload()
        model.image_encoder.to(accelerator.device)
        added = cache.build(paths, model.encode_images, model.config, accelerator.device, num_workers=num_workers,
                            autocast_dtype=AUTOCAST_DTYPES[mp], progress=show_progress)
    if accelerator.is_main_process and added:
        print(f"Cached image features of {added} images in {cache.dir} "
              f"({cache.nbytes_per_image() / 1024:.1f} KiB per image, both views)")
    return cache


def phrases_seen(phrases: list[str], augment: str) -> list[str]:
    """Every phrase training can feed the text encoder: flips swap left/right in them."""
    return phrases + ([swap_left_right(p) for p in phrases] if "flip" in parse_augment(augment) else [])


def build_text_cache(model: Grounder, tokenizer, tokenize, accelerator, mp: str, cache_dir, phrases: list[str],
                     show_progress: bool):
    """Encode every phrase once into the on-disk text cache (main process first)."""
    cache = open_text_cache(cache_dir or default_feature_cache_dir(), model.config, model.text_encoder, tokenizer)
    with accelerator.main_process_first():
        cache.reload()
        model.text_encoder.to(accelerator.device)
        added = cache.build(phrases, model, tokenize, accelerator.device, autocast_dtype=AUTOCAST_DTYPES[mp],
                            progress=show_progress)
    if accelerator.is_main_process and added:
        print(f"Cached text features of {added} phrases in {cache.dir}")
    return cache
