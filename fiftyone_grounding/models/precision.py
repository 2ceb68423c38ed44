"""Mixed precision: when bf16 is used, the autocast dtypes by name, and the one autocast context
that training, the feature caches and inference all run the model under."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..devices import cuda_capability

# ``mixed_precision`` names (Accelerate's) -> the autocast dtype (None: full precision)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def bf16_supported(device: Union[torch.device, str]) -> bool:
    """Whether ``device`` runs bf16 autocast at full speed: a CUDA GPU of compute capability 8.0 or
    above (Ampere on; older GPUs only emulate bf16, slower than float32), or a ROCm GPU; never the
    CPU. Asked of ``device`` itself (``cuda:1``, a rank's ``cuda:LOCAL_RANK``): torch's
    ``torch.cuda.is_bf16_supported()`` takes no device and asks the current GPU."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip:  # every ROCm GPU torch runs on has bf16
        return True
    return cuda_capability(device) >= (8, 0)


def default_mixed_precision(device: Union[torch.device, str]) -> str:
    """``mixed_precision="auto"`` on ``device``: "bf16" where it is supported, else "no"."""
    return "bf16" if bf16_supported(device) else "no"


def autocast(device: Union[torch.device, str], dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` on ``device``'s type; a no-op context for ``dtype=None``."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)
