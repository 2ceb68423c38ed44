"""What the data loaders hand a grounding model: items of one sample's image and its own phrase
(made by ``get_item.GroundingGetItem`` for ``apply_model``, by the fast apply path's loaders), and
batches of them that stack each distinct image once (:func:`collate_items`).
"""

from __future__ import annotations

import torch

PROMPT_KEY = "prompt_field"  # the get-item key that apply_model(prompt_field=...) fills in


def collate_items(items: list[dict]) -> dict:
    """Inference items (``id``, ``filepath``, ``phrase``, ``error``, and ``pixel_values`` or the
    cached ``image_features``) -> a batch that stacks each distinct image once and maps every
    phrase to it. The items of a prediction batch hold one kind of image input; an embedding
    batch may hold both (images the feature cache has, and the others): its images are numbered
    those with pixels first, then those with features."""
    valid = [i for i, it in enumerate(items) if it.get("error") is None]
    stacks: dict[str, list] = {"pixel_values": [], "image_features": []}
    image_of: dict[str, tuple[str, int]] = {}
    order = []
    for i in valid:
        path = items[i]["filepath"]
        if path not in image_of:
            kind = "image_features" if "image_features" in items[i] else "pixel_values"
            image_of[path] = (kind, len(stacks[kind]))
            stacks[kind].append(items[i][kind])
        order.append(image_of[path])
    first = {"pixel_values": 0, "image_features": len(stacks["pixel_values"])}
    return {
        "size": len(items),
        "ids": [it["id"] for it in items],
        "valid": valid,
        "phrases": [items[i]["phrase"] for i in valid],
        "errors": [(it["id"], it["error"]) for it in items if it.get("error") is not None],
        "pixel_values": torch.stack(stacks["pixel_values"]) if stacks["pixel_values"] else None,  # (I, S, S, 3) uint8
        "image_features": torch.stack(stacks["image_features"]) if stacks["image_features"] else None,  # (I, N, D)
        "image_index": torch.tensor([first[kind] + j for kind, j in order], dtype=torch.long),  # (B,)
    }
