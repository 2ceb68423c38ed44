"""Batches of image groups: the phrases of an image travel together, so each image is decoded
and encoded once per batch. Training and inference both pack their batches here."""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

MAX_WORKERS = 8
NUM_WORKERS_TEXT = f"{MAX_WORKERS} on a GPU, 0 on the CPU"


def default_num_workers(device) -> int:
    """Workers that load items (decode images, read cached features) when the caller gives
    none: on a GPU up to 8 beside it; on the CPU the model already uses every core, so items
    are loaded in the main process."""
    import torch

    return min(MAX_WORKERS, os.cpu_count() or 1) if torch.device(device).type == "cuda" else 0


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
