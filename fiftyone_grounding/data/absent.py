"""Absent-referent pairs: a training batch's phrases shown once more with another image of the
batch that holds no object of their kind, so that the confidence learns that an object is not
there (:func:`add_absent_pairs`)."""

from __future__ import annotations

import numpy as np
import torch


def add_absent_pairs(batch: dict, share: float, rng: np.random.Generator) -> dict:
    """The batch with a ``share`` of its phrases shown once more, each with another image of the
    batch that lacks its referent, so that the confidence learns that the object is not there: a
    phrase's object is absent from most of the images a search ranks, and one-box training data
    (RefCOCO) has no such phrase. An image lacks a phrase's referent when it holds no object of the
    kind the phrase names (``categories``: ``referent_kind`` or ``category``), judged by the kinds
    the image holds (``image_kinds``, every object's) or, where the data does not say, by the kinds
    of the image's own phrases in the batch; a phrase of unknown kind goes with any other image.
    The added rows have a NaN box and ``absent`` True; the first B rows are the batch's own
    (``absent`` False)."""
    phrases = batch.get("phrases") or []
    image_index = batch["image_index"]
    num_images = int(image_index.max()) + 1 if len(phrases) else 0
    if share <= 0 or num_images < 2:
        return batch
    image_of = image_index.tolist()
    categories = batch.get("categories") or [None] * len(phrases)
    image_kinds = batch.get("image_kinds") or [None] * num_images
    held: dict[int, set] = {i: set(kinds) for i, kinds in enumerate(image_kinds) if kinds is not None}
    for b, i in enumerate(image_of):
        if categories[b] is not None and image_kinds[i] is None:
            held.setdefault(i, set()).add(categories[b])
    count = max(1, int(round(share * len(phrases))))
    rows, images = [], []
    for b in rng.permutation(len(phrases))[:count].tolist():
        others = [i for i in range(num_images)
                  if i != image_of[b] and (categories[b] is None or categories[b] not in held.get(i, ()))]
        if not others:
            continue
        # the hardest: an image whose kinds share the most words with the phrase's ("the yellow
        # triangle" with an image of a red triangle and a yellow circle), ties at random
        words = set(categories[b].split()) if categories[b] else set()
        near = [len(words & {w for kind in held.get(i, ()) for w in kind.split()}) for i in others]
        hardest = [i for i, n in zip(others, near) if n == max(near)]
        rows.append(b)
        images.append(hardest[int(rng.integers(len(hardest)))])
    if not rows:
        return batch
    index = torch.tensor(rows, dtype=torch.long)
    out = dict(batch)
    for key in ("input_ids", "text_features", "attention_mask"):
        if key in batch:
            out[key] = torch.cat([batch[key], batch[key].index_select(0, index)])
    out["image_index"] = torch.cat([image_index, torch.tensor(images, dtype=image_index.dtype)])
    out["boxes"] = torch.cat([batch["boxes"], batch["boxes"].new_full((len(rows), 4), float("nan"))])
    out["absent"] = torch.cat([torch.zeros(len(phrases), dtype=torch.bool), torch.ones(len(rows), dtype=torch.bool)])
    out["phrases"] = list(phrases) + [phrases[b] for b in rows]
    return out
