"""Devices: which one a caller means, and what a device gets when the caller names no batch size
or worker count (the phrases per forward pass of the apply path and the workers that load items
beside the model). Kept light (torch is imported only when a device is asked about), so that the
command line's ``--help`` reads them without loading torch.

Every CUDA call that acts on one GPU goes through here with the device it is meant for (a
``"cuda:1"`` or a torchrun rank's ``cuda:LOCAL_RANK``), never CUDA's current GPU (GPU 0 unless
someone set another): :func:`on_device` (the block in which pinned copies, events, streams and
DataLoader pin threads belong to that GPU), :func:`synchronize`, :func:`reset_peak_memory`,
:func:`peak_memory_gib`, :func:`memory_allocated_gib` and :func:`cuda_capability` (what the bf16
decision of ``models.precision`` asks). ``tests/test_devices.py`` checks that no other code calls
CUDA's per-GPU functions without naming the GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

WORKER_TYPES = ("thread", "process")  # what decodes images for apply_grounding_model
APPLY_BATCH_SIZE = {"cuda": 256, "cpu": 64}  # phrases per forward pass when applying a model
APPLY_BATCH_SIZE_TEXT = f"{APPLY_BATCH_SIZE['cuda']} on a GPU, {APPLY_BATCH_SIZE['cpu']} on the CPU"
MAX_WORKERS = 8
NUM_WORKERS_TEXT = f"{MAX_WORKERS} on a GPU, 0 on the CPU"


def resolve_device(device=None):
    """``device`` as a ``torch.device``, its index kept (``"cuda:1"``, ``1`` -> ``cuda:1``); None or
    "": the GPU where there is one (``cuda``, without an index: CUDA's current GPU, which a launcher
    sets to the rank's own), else the CPU."""
    import torch

    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _is_cuda(device) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def cuda_index(device) -> Optional[int]:
    """The index of the CUDA GPU that ``device`` names: its own (``cuda:1`` -> 1), for a bare
    ``"cuda"`` the current GPU's (where torch then puts its tensors); None for any other device."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def on_device(device):
    """A context in which ``device`` is CUDA's current GPU, so that what torch ties to the current
    GPU (pinned host memory, events, streams, a DataLoader's pin-memory thread, kernels of
    libraries that ask for "cuda") is tied to it; a no-op context for other devices and for a
    bare ``"cuda"`` (already the current GPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a CUDA GPU; nothing to wait for elsewhere)."""
    import torch

    if _is_cuda(device):
        torch.cuda.synchronize(device)


def cuda_capability(device) -> Optional[tuple[int, int]]:
    """``device``'s CUDA compute capability, (8, 0) for an A100; None where it is no CUDA GPU."""
    import torch

    if not _is_cuda(device) or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def reset_peak_memory(device) -> None:
    """Start ``device``'s peak-memory count afresh (a CUDA GPU; nothing elsewhere)."""
    import torch

    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> Optional[float]:
    """The most memory tensors held on ``device`` since :func:`reset_peak_memory` (GiB); None off CUDA."""
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if _is_cuda(device) else None


def memory_allocated_gib(device) -> Optional[float]:
    """The memory tensors hold on ``device`` now (GiB); None off CUDA."""
    import torch

    return torch.cuda.memory_allocated(device) / 2**30 if _is_cuda(device) else None


def default_apply_batch_size(device) -> int:
    """Phrases per forward pass when applying a model and the caller gives none: 256 on a
    GPU (the host's cost per batch is then small against the GPU's work; the speed figures
    are measured at 256), 64 on the CPU (larger batches gain nothing there)."""
    return APPLY_BATCH_SIZE["cuda" if _is_cuda(device) else "cpu"]


def default_num_workers(device) -> int:
    """Workers that load items (decode images, read cached features) when the caller gives
    none: on a GPU up to 8 beside it; on the CPU the model already uses every core, so items
    are loaded in the main process."""
    return min(MAX_WORKERS, os.cpu_count() or 1) if _is_cuda(device) else 0
