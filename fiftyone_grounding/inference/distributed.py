"""Inference over many processes: apply, search and label-error scoring under ``torchrun`` or
``accelerate launch``, one or many nodes, every process reading and writing one shared database.

Each process (a *rank*) takes the images whose path hashes to it (:meth:`Shard.owns`: CRC-32 of
the file path modulo the number of ranks), so an image's phrases are all on one rank and no two
ranks write one sample. The split needs no message between ranks and does not depend on what is
already written: a rank that restarts with ``skip_existing`` finds its own unfinished images,
whatever the other ranks did meanwhile. Each rank runs its own loader and model on its own device
(``cuda:LOCAL_RANK``) and writes its labels in bulk, as one process does. The ranks meet twice in
a small ``gloo`` process group (CPU only, whatever the device): after rank 0 has declared the
field (FiftyOne saves a dataset's field list whole, so two ranks declaring it at once can lose it),
and at the end, where rank 0 records the run and prints the totals of all.

Nothing here schedules or retries: the launcher starts the ranks (and, with ``torchrun``, stops
the others when one dies); a rerun with ``skip_existing`` finishes what a dead rank left.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional

from ..errors import InputError

LAUNCH_HINT = ("run it under a launcher that starts one process per device, e.g. `torchrun --nproc_per_node 2 "
               "-m fiftyone_grounding.cli apply --distributed ...` or `accelerate launch --num_processes 2 "
               "-m fiftyone_grounding.cli apply --distributed ...`")
# How long a rank that finished waits for the slowest one at the end (a shard can take hours).
END_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Shard:
    """Which part of a view this process runs: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owns(self, filepath: str) -> bool:
        """Whether this rank runs the image at ``filepath`` (every rank agrees, with no message)."""
        return self.world_size == 1 or zlib.crc32(filepath.encode("utf-8")) % self.world_size == self.rank

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


ONE_PROCESS = Shard()


def launched_shard() -> Shard:
    """This process's shard as ``torchrun`` / ``accelerate launch`` set it (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``), or the one of an initialized ``torch.distributed`` group; a sentence saying
    how to launch when there is neither."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise InputError(f"distributed=True (--distributed) needs the ranks of a launcher: {LAUNCH_HINT}.") from None
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is not below WORLD_SIZE={world}: {LAUNCH_HINT}.")
    return Shard(rank, world, local)


def shard_of(distributed) -> Shard:
    """``distributed``: False (one process), True (the launcher's shard) or a :class:`Shard`."""
    if isinstance(distributed, Shard):
        return distributed
    return launched_shard() if distributed else ONE_PROCESS


def rank_device(device=None, shard: Shard = ONE_PROCESS):
    """The device of this rank: ``device`` where it names an index (``cuda:1``), else the rank's own
    GPU, ``cuda:LOCAL_RANK`` (``device="cuda"`` or none given where CUDA is present), else the CPU."""
    import torch

    from ..devices import resolve_device

    chosen = resolve_device(device)
    if chosen.type == "cuda" and chosen.index is None and shard.distributed:
        count = torch.cuda.device_count()
        if shard.local_rank >= count:
            raise InputError(f"{shard} has local rank {shard.local_rank}, but this node has {count} GPU(s): start "
                             f"at most {count} processes per node (torchrun --nproc_per_node {count}).")
        return torch.device("cuda", shard.local_rank)
    return chosen


class Group:
    """The ranks' meeting points: :meth:`barrier` and :meth:`gather` (both nothing in one process)."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def barrier(self) -> None:
        if self.shard.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.shard.distributed:
            return [value]
        import torch.distributed as dist

        values = [None] * self.shard.world_size
        dist.all_gather_object(values, value)
        return values


@contextlib.contextmanager
def process_group(shard: Shard) -> Iterator[Group]:
    """A ``gloo`` group of the launcher's ranks for the block (the caller's own group where one is
    initialized; it is left as it was)."""
    if not shard.distributed:
        yield Group(shard)
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=shard.rank, world_size=shard.world_size, timeout=END_TIMEOUT)
    try:
        yield Group(shard)
    finally:
        if created:
            dist.destroy_process_group()


def first_rank_first(group: Group, action, *args) -> Optional[object]:
    """Run ``action(*args)`` on rank 0, then on the others once it is done (e.g. declaring a field,
    which two ranks must not do at once); returns this rank's result."""
    result = action(*args) if group.shard.rank == 0 else None
    group.barrier()
    if group.shard.rank != 0:
        result = action(*args)
    return result
