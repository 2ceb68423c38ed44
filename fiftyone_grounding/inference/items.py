"""What the data loaders hand a grounding model: one sample's image and its own phrase
(:class:`GroundingGetItem`, FiftyOne's get-item), and batches of them that stack each distinct
image once (:func:`collate_items`), for ``apply_model`` and the fast apply path alike.
"""

from __future__ import annotations

from typing import Optional

import torch
import fiftyone.utils.torch as fout

from ..data.images import resized_pixels
from ..data.text import NO_PHRASE, clean_phrase

PROMPT_KEY = "prompt_field"  # the get-item key that apply_model(prompt_field=...) fills in


class GroundingGetItem(fout.GetItem):
    """Loads one sample for inference: its image and its own phrase, together (or, with
    ``prompt``, the one phrase of every sample)."""

    def __init__(self, image_size: int, field_mapping=None, prompt: Optional[str] = None):
        self.image_size = image_size
        self.prompt = prompt
        self._last: Optional[tuple] = None  # (filepath, pixels, error) of the previous item
        super().__init__(field_mapping=field_mapping)

    @property
    def required_keys(self):
        return ["id", "filepath"] + ([PROMPT_KEY] if self.prompt is None else [])

    def __call__(self, d: dict) -> dict:
        phrase = self.prompt if self.prompt is not None else clean_phrase(d.get(PROMPT_KEY))
        item = {"id": d.get("id"), "filepath": d["filepath"], "phrase": phrase, "error": None}
        if item["phrase"] is None:
            item["error"] = NO_PHRASE
            return item
        # The expressions of an image are consecutive samples: decode the image once for
        # all of them (decoding costs more than the model on small models).
        if self._last is None or self._last[0] != d["filepath"]:
            self._last = (d["filepath"], *resized_pixels(d["filepath"], self.image_size))
        if self._last[2] is not None:
            item["error"] = self._last[2]
        else:
            item["pixel_values"] = self._last[1]
        return item


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
