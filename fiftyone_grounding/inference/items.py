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
    phrase to it. The items of a batch hold one kind of image input."""
    valid = [i for i, it in enumerate(items) if it.get("error") is None]
    kind = "image_features" if valid and "image_features" in items[valid[0]] else "pixel_values"
    image_of: dict[str, int] = {}
    images, index = [], []
    for i in valid:
        path = items[i]["filepath"]
        if path not in image_of:
            image_of[path] = len(images)
            images.append(items[i][kind])
        index.append(image_of[path])
    stacked = torch.stack(images) if images else None
    return {
        "size": len(items),
        "ids": [it["id"] for it in items],
        "valid": valid,
        "phrases": [items[i]["phrase"] for i in valid],
        "errors": [(it["id"], it["error"]) for it in items if it.get("error") is not None],
        "pixel_values": stacked if kind == "pixel_values" else None,  # (I, S, S, 3) uint8
        "image_features": stacked if kind == "image_features" else None,  # (I, N, D) float16
        "image_index": torch.tensor(index, dtype=torch.long),  # (B,)
    }
