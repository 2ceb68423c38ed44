"""The DataLoaders of a run: training batches grouped by image, each process taking its own share,
and validation batches in order, over the frozen-feature caches when the run can use them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch.utils.data import DataLoader

from ..data.batching import Collator, GroupBatchSampler
from ..devices import default_num_workers
from ..data.datasets import GroundingDataset
from ..models.build import build_tokenizer
from ..models.decoder import Grounder
from .caches import build_feature_cache, build_text_cache, cache_fits, phrases_seen
from .config import TrainConfig
from .splits import Splits


@dataclass
class Loaders:
    train: DataLoader
    sampler: GroupBatchSampler
    train_set: GroundingDataset
    val: Optional[DataLoader]


def build_loaders(model: Grounder, splits: Splits, cfg: TrainConfig, accelerator, mp: str,
                  show_progress: bool) -> Loaders:
    """The train and val DataLoaders, over the feature caches when they can be used."""
    config = model.config
    is_main = accelerator.is_main_process
    num_workers = default_num_workers(accelerator.device) if cfg.num_workers is None else cfg.num_workers
    feature_cache = None
    if cfg.cache_features and cache_fits(model, cfg, len(set(splits.filepaths)), is_main):
        feature_cache = build_feature_cache(model, accelerator, mp, cfg.cache_dir, splits.filepaths, num_workers,
                                            show_progress)
    tokenizer = build_tokenizer(config)
    collate = Collator(tokenizer, config.max_text_len)
    # Phrases cut to the encoder's limit get one warning for the whole run, from here in the main
    # process: the other processes and the DataLoader workers get a collator that has warned.
    collate.tokenize.warned = not is_main
    collate.tokenize(splits.phrases)
    if feature_cache is not None:
        val_phrases = splits.val.phrases if splits.val else []
        collate.text_cache = build_text_cache(model, tokenizer, collate.tokenize, accelerator, mp, cfg.cache_dir,
                                              phrases_seen(splits.train.phrases, cfg.augment) + val_phrases,
                                              show_progress)
    train_set = GroundingDataset(splits.train, config.image_size, config.image_mean, config.image_std,
                                 augment=cfg.augment, seed=cfg.seed, feature_cache=feature_cache)
    # Each process takes its own share of the batches (sharding is ours, not accelerate's:
    # batches hold a varying number of phrases, which its batch-sampler shards assume not).
    world, rank = accelerator.num_processes, accelerator.process_index
    # Batches carry their epoch, so that the workers can live through all epochs (no start-up
    # cost per epoch) and still pick each epoch's augmentation.
    sampler = GroupBatchSampler(train_set.group_sizes(), cfg.batch_size, shuffle=True, seed=cfg.seed,
                                num_replicas=world, rank=rank, tag_epoch=True)
    loader_kwargs = dict(collate_fn=collate, num_workers=num_workers,
                         pin_memory=accelerator.device.type == "cuda",
                         persistent_workers=num_workers > 0)
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kwargs)
    val_loader = None
    if splits.val is not None:
        val_set = GroundingDataset(splits.val, config.image_size, config.image_mean, config.image_std,
                                   feature_cache=feature_cache)
        val_sampler = GroupBatchSampler(val_set.group_sizes(), cfg.batch_size, shuffle=False,
                                        num_replicas=world, rank=rank, pad=False)
        val_loader = DataLoader(val_set, batch_sampler=val_sampler, **loader_kwargs)
    return Loaders(train_loader, sampler, train_set, val_loader)
