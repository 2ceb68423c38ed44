"""FiftyOne's get-item for ``dataset.apply_model(model)``: one sample's image and its own phrase.
Its own module because FiftyOne's torch utilities load torchvision's models (seconds of imports)
that the fast apply path, search and the command line never need: ``GroundingModel`` imports it
when FiftyOne asks for it."""

from __future__ import annotations

from typing import Optional

import fiftyone.utils.torch as fout

from ..data.images import resized_pixels
from ..data.text import NO_PHRASE, clean_phrase
from .items import PROMPT_KEY


class GroundingGetItem(fout.GetItem):
    """Loads one sample for inference: its image and its own phrase, together (or, with
    ``prompt``, the one phrase of every sample)."""

    def __init__(self, image_size: int, field_mapping=None, prompt: Optional[str] = None, features=None):
        """``features``: a feature cache whose images are read from it, not decoded (embeddings)."""
        self.image_size = image_size
        self.prompt = prompt
        self.features = features
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
        if self.features is not None and d["filepath"] in self.features:
            item["image_features"] = self.features.get(d["filepath"], 0)  # (N, D) float16, the unmirrored view
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
