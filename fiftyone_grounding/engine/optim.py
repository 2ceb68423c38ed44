"""The optimizer and its schedule: AdamW over the trainable parameters (no decay on biases, norms
and learned tokens), the cosine schedule with linear warm-up, and the groups clipped apart."""

from __future__ import annotations

import math
from typing import Callable

import torch


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# Learned tokens, embeddings and box anchors: no weight decay (decay would pull a [REG] token or
# a level embedding towards zero, and a box anchor, in logit space, towards the image's centre).
NO_DECAY_PARAMETERS = ("reg_token", "query_anchor", "query_content", "level_embed", "type_embed")


def configure_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; no decay on biases, norms and the parameters of
    ``NO_DECAY_PARAMETERS``. Fused (one kernel for all parameters) when they are on a GPU."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        learned_token = name.rsplit(".", 1)[-1] in NO_DECAY_PARAMETERS
        (decay if p.dim() >= 2 and not learned_token else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def clip_groups(model) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters in the groups whose gradient norms are clipped apart: the
    quality head learns from its own loss alone, so its gradients must not scale down the box's."""
    main, quality = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (quality if "quality_head." in name else main).append(p)
    return [group for group in (main, quality) if group]
