"""Batches of image groups: the phrases of an image travel together, so each image is decoded
and encoded once per batch. Training and inference both pack their batches here
(:class:`GroupBatchSampler`); :class:`Collator` stacks a batch's items and tokenizes its phrases."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .text import PhraseTokenizer

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
        if "targets" in items[0]:
            batch["targets"] = [t for it in items for t in it["targets"]]  # B tensors (g, 4)
        batch["categories"] = [c for it in items for c in it.get("categories", [None] * len(it["phrases"]))]
        batch["images"] = [it.get("image") for it in items]  # (I,) the image of each row of the image tensor
        batch["image_kinds"] = [it.get("image_kinds") for it in items]  # (I,) the kinds each image holds
        if "crop_area" in items[0]:
            batch["crop_areas"] = [it["crop_area"] for it in items]
        return batch
