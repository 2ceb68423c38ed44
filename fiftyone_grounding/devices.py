"""What a device gets when the caller names no batch size or worker count: the phrases per
forward pass of the apply path and the workers that load items beside the model. Kept light
(torch is imported only when a device is asked about), so that the command line's ``--help`` reads
them without loading torch."""

from __future__ import annotations

import os

WORKER_TYPES = ("thread", "process")  # what decodes images for apply_grounding_model
APPLY_BATCH_SIZE = {"cuda": 256, "cpu": 64}  # phrases per forward pass when applying a model
APPLY_BATCH_SIZE_TEXT = f"{APPLY_BATCH_SIZE['cuda']} on a GPU, {APPLY_BATCH_SIZE['cpu']} on the CPU"
MAX_WORKERS = 8
NUM_WORKERS_TEXT = f"{MAX_WORKERS} on a GPU, 0 on the CPU"


def resolve_device(device=None):
    """``device`` as a ``torch.device``; None: the GPU where there is one, else the CPU."""
    import torch

    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_cuda(device) -> bool:
    import torch

    return torch.device(device).type == "cuda"


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
