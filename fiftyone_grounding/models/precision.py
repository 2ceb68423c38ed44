"""Mixed precision: when bf16 is used, the autocast dtypes by name, and the one autocast context
that training, the feature caches and inference all run the model under."""

from __future__ import annotations

from typing import Optional, Union

import torch

# ``mixed_precision`` names (Accelerate's) -> the autocast dtype (None: full precision)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 autocast: a CUDA GPU that supports it (never the CPU)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def default_mixed_precision(device: torch.device) -> str:
    """``mixed_precision="auto"`` on ``device``: "bf16" where it is supported, else "no"."""
    return "bf16" if bf16_supported(device) else "no"


def autocast(device: Union[torch.device, str], dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``'s type; a no-op context for ``dtype=None``."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)
