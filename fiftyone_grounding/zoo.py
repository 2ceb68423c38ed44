"""``GroundingModel``: the grounding network as a FiftyOne model.

``dataset.apply_model(model, label_field="pred", prompt_field="expression", batch_size=32)``
batches for real (``SupportsGetItem`` + ``TorchModelMixin`` with a collate function:
FiftyOne drops ``batch_size`` to 1 for ``ragged_batches=True`` models), reads each
sample's OWN phrase inside the data loader item (so it cannot drift to another sample),
and writes no prediction where the phrase is missing or empty or the image unreadable.
:func:`apply_grounding_model` is the faster path that the CLI and the operators use: one
query for ids, paths and phrases, samples grouped by image wherever they are in the view,
bulk writes by id, and ``skip_existing`` to finish an interrupted run.
"""

from __future__ import annotations

import collections
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import fiftyone.core.models as fom
import fiftyone.utils.torch as fout

from .checkpoint import load_checkpoint
from .config import WORKER_TYPES
from .data import (NO_PHRASE, GroupBatchSampler, PhraseTokenizer, clean_phrase, default_apply_batch_size,
                   default_num_workers, load_rgb, normalize_pixels_batch, resize_rgb, rgb_tensor)
from .labels import detections_doc, make_detections
from .model import Grounder, build_model, build_tokenizer

logger = logging.getLogger(__name__)

PROMPT_KEY = "prompt_field"


def _pixels(path: str, image_size: int) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(resized uint8 (S, S, 3) image, None) for an image file, or (None, why it cannot be read).

    Items carry uint8 pixels (a quarter of the bytes of float32 between DataLoader workers,
    pinned memory and the GPU); ``predict_boxes`` normalizes them on the model's device.
    """
    try:
        return rgb_tensor(resize_rgb(load_rgb(path), image_size)), None
    except ValueError as e:
        return None, str(e)


class GroundingGetItem(fout.GetItem):
    """Loads one sample for inference: its image and its own phrase, together."""

    def __init__(self, image_size: int, field_mapping=None):
        self.image_size = image_size
        self._last: Optional[tuple] = None  # (filepath, pixels, error) of the previous item
        super().__init__(field_mapping=field_mapping)

    @property
    def required_keys(self):
        return ["id", "filepath", PROMPT_KEY]

    def __call__(self, d: dict) -> dict:
        item = {"id": d.get("id"), "filepath": d["filepath"], "phrase": clean_phrase(d.get(PROMPT_KEY)),
                "error": None}
        if item["phrase"] is None:
            item["error"] = NO_PHRASE
            return item
        # The expressions of an image are consecutive samples: decode the image once for
        # all of them (decoding costs more than the model on small models).
        if self._last is None or self._last[0] != d["filepath"]:
            self._last = (d["filepath"], *_pixels(d["filepath"], self.image_size))
        if self._last[2] is not None:
            item["error"] = self._last[2]
        else:
            item["pixel_values"] = self._last[1]
        return item


def collate_items(items: list[dict]) -> dict:
    """Stacks each distinct image once and maps every phrase to it."""
    valid = [i for i, it in enumerate(items) if it.get("error") is None]
    image_of: dict[str, int] = {}
    pixels, index = [], []
    for i in valid:
        path = items[i]["filepath"]
        if path not in image_of:
            image_of[path] = len(pixels)
            pixels.append(items[i]["pixel_values"])
        index.append(image_of[path])
    return {
        "size": len(items),
        "valid": valid,
        "phrases": [items[i]["phrase"] for i in valid],
        "errors": [(it["id"], it["error"]) for it in items if it.get("error") is not None],
        "pixel_values": torch.stack(pixels) if pixels else None,  # (I, S, S, 3) uint8
        "image_index": torch.tensor(index, dtype=torch.long),  # (B,)
    }


class GroundingModel(fom.Model, fom.SupportsGetItem, fom.TorchModelMixin):
    """A trained grounding network wrapped for ``apply_model`` and the model zoo."""

    def __init__(self, model: Grounder, device: Optional[Union[str, torch.device]] = None,
                 mixed_precision: str = "auto"):
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._using_gpu = self._device.type == "cuda"
        self.model = model.to(self._device).eval()
        self.config = model.config
        self.tokenize = PhraseTokenizer(build_tokenizer(model.config), model.config.max_text_len)
        self._preprocess = True
        if mixed_precision == "auto":
            use_bf16 = self._using_gpu and torch.cuda.is_bf16_supported()
        else:
            use_bf16 = mixed_precision == "bf16"
        self._autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.forward_calls = 0  # number of batched forward passes, for inspection
        self.skipped: list[tuple[str, str]] = []  # (sample id, reason) of the last run

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path, device=None, **kwargs) -> "GroundingModel":
        """Load a checkpoint folder (``config.json`` + ``model.safetensors``)."""
        return cls(load_checkpoint(path), device=device, **kwargs)

    @classmethod
    def from_preset(cls, preset: str, weights: bool = True, device=None, **overrides) -> "GroundingModel":
        """An untrained model of a preset (for timing, or to fine-tune)."""
        return cls(build_model(preset, weights=weights, **overrides), device=device)

    # -- FiftyOne Model interface --------------------------------------------------------

    @property
    def media_type(self):
        return "image"

    @property
    def has_logits(self):
        return False

    @property
    def has_embeddings(self):
        return False

    @property
    def ragged_batches(self):
        return False  # every image is resized to the same square: batches stack

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self):
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value):
        self._preprocess = value

    @property
    def has_collate_fn(self):
        return True

    @staticmethod
    def collate_fn(batch):
        return collate_items(batch)

    def build_get_item(self, field_mapping=None):
        return GroundingGetItem(self.config.image_size, field_mapping=field_mapping)

    def __enter__(self):
        self.skipped = []
        self.tokenize.warned = False  # one warning about cut phrases per run
        return self

    def __exit__(self, *args):
        if self.skipped:
            reasons: dict[str, int] = {}
            for _, why in self.skipped:
                reasons[why] = reasons.get(why, 0) + 1
            logger.warning("No prediction for %d samples: %s", len(self.skipped),
                           ", ".join(f"{n} x {r}" for r, n in reasons.items()))
        return False

    def predict(self, arg, phrase: Optional[str] = None):
        """One image (uint8 HWC array or PIL image) and its phrase -> ``Detections``."""
        if isinstance(arg, dict):
            return self.predict_all([arg])[0]
        if phrase is None:
            raise ValueError("GroundingModel.predict needs a phrase: predict(image, phrase)")
        image = np.asarray(arg.convert("RGB")) if hasattr(arg, "convert") else np.asarray(arg)
        item = {"id": None, "filepath": "<array>", "phrase": clean_phrase(phrase), "error": None}
        if item["phrase"] is None:
            return None
        item["pixel_values"] = rgb_tensor(resize_rgb(image, self.config.image_size))
        return self._predict_batch(collate_items([item]))[0]

    def predict_all(self, args, samples=None):
        batch = args if isinstance(args, dict) else collate_items(list(args))
        return self._predict_batch(batch)

    def predict_boxes(self, pixel_values: torch.Tensor, phrases: Sequence[str],
                      image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalized xyxy boxes (B, 4) for phrases over images: resized uint8 (I, S, S, 3),
        or model input (I, 3, S, S) already normalized."""
        return self.predict_boxes_async(pixel_values, phrases, image_index)()

    @torch.inference_mode()
    def predict_boxes_async(self, pixel_values: torch.Tensor, phrases: Sequence[str],
                            image_index: Optional[torch.Tensor] = None) -> Callable[[], torch.Tensor]:
        """Like :meth:`predict_boxes`, but returns as soon as the work is queued on a GPU:
        call the result to wait for the (B, 4) boxes on the CPU. The caller can prepare the
        next batch or write the previous one's labels while the GPU runs."""
        cuda = self._device.type == "cuda"

        def to_device(t: torch.Tensor) -> torch.Tensor:
            # from pinned memory a copy to the GPU does not wait for the batch still running there
            pin = cuda and t.device.type == "cpu" and not t.is_pinned()
            return (t.pin_memory() if pin else t).to(self._device, non_blocking=True)

        tokens = self.tokenize(phrases)
        pixel_values = to_device(pixel_values)
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_pixels_batch(pixel_values, self.config.image_mean, self.config.image_std)
        ids, mask = to_device(tokens["input_ids"]), to_device(tokens["attention_mask"])
        if image_index is not None:
            image_index = to_device(image_index)
        with torch.autocast(self._device.type, dtype=self._autocast_dtype or torch.float32,
                            enabled=self._autocast_dtype is not None):
            boxes = self.model(pixel_values, ids, mask, image_index).float()
        self.forward_calls += 1
        if not cuda:
            boxes = boxes.cpu()
            return lambda: boxes
        # Copy into pinned memory behind the model on the same stream; the event marks its end
        # (a plain .cpu() later would also wait for every batch queued after this one).
        host = torch.empty(boxes.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(boxes, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(boxes.device))  # the model's GPU, not the current one

        def wait() -> torch.Tensor:
            copied.synchronize()
            return host

        return wait

    def _predict_batch(self, batch: dict, make_label=make_detections) -> list:
        """A label per item of a collated batch (None where it was skipped), made by
        ``make_label(box_xyxy, phrase, confidence=1.0)``."""
        return self._predict_batch_async(batch, make_label)()

    def _predict_batch_async(self, batch: dict, make_label=make_detections) -> Callable[[], list]:
        """Queues the model on a collated batch; returns a function that waits for it and
        gives the labels of :meth:`_predict_batch`."""
        self.skipped.extend(batch["errors"])
        wait = (self.predict_boxes_async(batch["pixel_values"], batch["phrases"], batch["image_index"])
                if batch["valid"] else None)

        def labels() -> list:
            out: list = [None] * batch["size"]
            if wait is not None:
                for i, phrase, box in zip(batch["valid"], batch["phrases"], wait().tolist()):
                    out[i] = make_label(box, phrase, confidence=1.0)
            return out

        return labels


def ground_phrase(view, phrase: str, model: GroundingModel, label_field: str = "grounded",
                  batch_size: int = 32) -> int:
    """Find one typed ``phrase`` in every image of ``view``; writes a one-box ``Detections`` each.

    Returns how many samples got a box (an unreadable image gets none).
    """
    text = clean_phrase(phrase)
    if text is None:
        raise ValueError("The phrase is empty: type what to find, e.g. 'the red circle on the left'")
    _declare_field(view._root_dataset, label_field)
    get_item = model.build_get_item()
    ids, paths = view.values(["id", "filepath"])
    labels: list = []
    with model:
        for start in range(0, len(paths), batch_size):
            items = [get_item({"id": sid, "filepath": path, PROMPT_KEY: text})
                     for sid, path in zip(ids[start:start + batch_size], paths[start:start + batch_size])]
            labels.extend(model.predict_all(collate_items(items)))
    view.set_values(label_field, labels)
    return sum(label is not None for label in labels)


class _ImageGroups(torch.utils.data.Dataset):
    """Inference items are images: each decoded and resized once, with its samples' phrases."""

    def __init__(self, groups: list[tuple[str, list[tuple[str, str]]]], image_size: int):
        self.groups = groups  # [(filepath, [(sample id, phrase), ...]), ...]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[dict]:
        path, members = self.groups[index]
        pixels, error = _pixels(path, self.image_size)
        return [{"id": sid, "filepath": path, "phrase": phrase, "error": error, "pixel_values": pixels}
                for sid, phrase in members]


def _collate_groups(groups: list[list[dict]]) -> dict:
    items = [item for group in groups for item in group]
    return {**collate_items(items), "ids": [item["id"] for item in items]}



def _thread_loader(items: _ImageGroups, batches, threads: int, prefetch: int = 4):
    """Collated batches of ``items`` in order, their images decoded by a pool of ``threads``
    threads up to ``prefetch`` batches ahead (0 threads: in the calling thread).

    PIL decodes and OpenCV resizes without the GIL, so threads decode in parallel like
    DataLoader processes, but nothing is started or forked: no start-up cost, no copy of a
    process that holds the model and a CUDA context, and it may run inside the App's server.
    """
    if threads == 0:
        for indices in batches:
            yield _collate_groups([items[i] for i in indices])
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="fiftyone-grounding-decode")
    try:
        order = iter(batches)
        pending = collections.deque()
        for indices in itertools.islice(order, prefetch):
            pending.append([pool.submit(items.__getitem__, i) for i in indices])
        while pending:
            futures = pending.popleft()
            for indices in itertools.islice(order, 1):
                pending.append([pool.submit(items.__getitem__, i) for i in indices])
            yield _collate_groups([f.result() for f in futures])
    finally:  # also when the caller stops early (an error, Ctrl-C): drop the queued images
        pool.shutdown(wait=True, cancel_futures=True)


def apply_grounding_model(view, model: GroundingModel, label_field: str = "predictions",
                          prompt_field: str = "expression", batch_size: Optional[int] = None,
                          num_workers: Optional[int] = None, worker_type: str = "thread",
                          skip_existing: bool = False, progress: Optional[bool] = None,
                          progress_callback=None, write_every: int = 1024,
                          overlap: Optional[bool] = None) -> dict:
    """Predict a box for every sample of ``view`` from its own phrase in ``prompt_field`` and
    write it to ``label_field`` (one ``Detections``); the fast path behind the CLI and the
    operators, equal in result to ``view.apply_model(model, label_field, prompt_field=...)``.

    - Reads ids, file paths and phrases in one query, groups the samples by image (each image
      decoded and encoded once per batch, wherever its samples are in the view), runs
      batches of about ``batch_size`` phrases (default: 256 on a GPU, 64 on the CPU), and
      writes the labels in bulk by sample id every ``write_every`` samples, so an
      interrupted run keeps what it wrote. The writes run in one background thread, a chunk
      at a time (as FiftyOne's ``apply_model`` does with ``async_writes``), so the loop that
      feeds a GPU does not wait for the database (60-110 us per sample). Every chunk is
      written before the call returns or raises.
    - ``num_workers`` decode the images ahead of the model (default: 8 on CUDA, 0 on the
      CPU, where the model already uses every core): threads (``worker_type="thread"``, the
      default: nothing to start, safe inside the App's server) or DataLoader processes
      (``"process"``).
    - ``overlap`` (default: on CUDA): keep one batch in flight, so the host queues the next
      batch and writes the previous one's labels while the GPU runs. Elsewhere the model
      has run when its call returns, and the progress is then exact to the batch.
    - ``skip_existing``: only the samples with no prediction in ``label_field`` yet (finish an
      interrupted run).
    - Samples with a missing or empty phrase, or an unreadable image, get no prediction; they
      are returned with the reason (and logged).

    Returns ``{"processed": number of samples run, "skipped": [(sample id, reason), ...]}``.
    """
    import fiftyone.core.utils as fou

    if batch_size is None:
        batch_size = default_apply_batch_size(model._device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if worker_type not in WORKER_TYPES:
        raise ValueError(f"worker_type must be one of {', '.join(WORKER_TYPES)}, got {worker_type!r}")
    todo = view.exists(label_field, False) if skip_existing and view.has_field(label_field) else view
    if not todo.has_field(prompt_field):
        raise ValueError(f"The view has no field {prompt_field!r} with the phrases; pass prompt_field=")
    ids, paths, phrases = todo.values(["id", "filepath", prompt_field])
    if not ids:
        return {"processed": 0, "skipped": []}
    skipped: list[tuple[str, str]] = []
    groups: dict[str, list[tuple[str, str]]] = {}
    for sid, path, phrase in zip(ids, paths, phrases):
        text = clean_phrase(phrase)
        if text is None:
            skipped.append((sid, NO_PHRASE))
        else:
            groups.setdefault(path, []).append((sid, text))
    dataset = view._root_dataset  # the dataset of the view (FiftyOne has no public name for it)
    _declare_field(dataset, label_field)

    items = _ImageGroups(list(groups.items()), model.config.image_size)
    batches = GroupBatchSampler([len(m) for _, m in items.groups], batch_size, shuffle=False)
    workers = default_num_workers(model._device) if num_workers is None else num_workers
    if worker_type == "thread":
        loader = _thread_loader(items, batches, workers)  # predict_boxes_async pins the pixels
    else:
        workers = min(workers, len(batches))  # a few selected samples start no idle processes
        loader = iter(torch.utils.data.DataLoader(
            items, batch_sampler=batches,
            num_workers=workers, collate_fn=_collate_groups, pin_memory=model._using_gpu,
            prefetch_factor=4 if workers else None,
        ))
    pending: dict = {}
    writer = ThreadPoolExecutor(1, thread_name_prefix="fiftyone-grounding-write")
    writing = None  # the chunk being written (a Future)

    def keep(batch: dict, labels: Callable[[], list]) -> None:
        for sid, label in zip(batch["ids"], labels()):
            if label is not None:
                pending[sid] = label

    def write(chunk: dict) -> None:
        dataset.set_values(label_field, chunk, key_field="id", validate=False)

    def flush(wait: bool = False) -> None:
        """Hand the labels kept to the writer (one chunk at a time: waits for the previous
        one, and raises its error here); ``wait``: write them in this thread."""
        nonlocal writing, pending
        previous, writing = writing, None
        try:
            if previous is not None:
                previous.result()
        finally:  # even if that chunk failed: do not drop these
            if pending:
                chunk, pending = pending, {}  # keep() fills the new dict
                if wait:
                    write(chunk)
                else:
                    writing = writer.submit(write, chunk)

    done, total = len(skipped), len(ids)
    in_flight = None  # (batch, its labels): queued on the device, not kept yet
    if overlap is None:
        overlap = model._device.type == "cuda"

    def settle() -> None:
        nonlocal in_flight, done
        (batch, labels), in_flight = in_flight, None
        keep(batch, labels)
        done += batch["size"]
        bar.update(batch["size"])
        if progress_callback is not None:
            progress_callback(done / total, f"{done:,} of {total:,} samples")
        if len(pending) >= write_every:
            flush()

    with model, fou.ProgressBar(total=total, progress=progress) as bar:
        model.skipped.extend(skipped)
        bar.update(len(skipped))
        try:
            # One batch in flight on a GPU: while it runs batch k, the host queues batch k + 1
            # and keeps (and writes) the labels of batch k - 1. Labels in database form:
            # building FiftyOne objects costs more than the model.
            for batch in loader:
                queued = (batch, model._predict_batch_async(batch, detections_doc))
                if in_flight is not None:
                    settle()
                in_flight = queued
                if not overlap:
                    settle()
            if in_flight is not None:
                settle()
        finally:  # also on Ctrl-C or an error: keep every prediction made so far, stop the workers
            try:
                if in_flight is not None:
                    keep(*in_flight)
            finally:
                try:
                    flush(wait=True)
                finally:
                    writer.shutdown(wait=True)  # also a chunk whose wait was interrupted
                    if worker_type == "thread":
                        loader.close()
        skipped = list(model.skipped)
    _redeclare_if_dropped(dataset, label_field)
    return {"processed": total, "skipped": skipped}


def _declare_field(dataset, label_field: str) -> None:
    """Declare ``label_field`` as a ``Detections`` field unless the dataset has it; refuse a
    field of another type (bulk writes skip validation: they would leave unreadable samples)."""
    import fiftyone as fo

    if not dataset.has_field(label_field):
        dataset.add_sample_field(label_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
        return
    field = dataset.get_field(label_field)
    doc_type = getattr(field, "document_type", None)
    if doc_type is not fo.Detections:
        kind = doc_type.__name__ if doc_type is not None else type(field).__name__
        raise ValueError(
            f"The field {label_field!r} already holds {kind}, not Detections: choose another label field, "
            f"or delete it first with dataset.delete_sample_field({label_field!r})")


def _redeclare_if_dropped(dataset, label_field: str) -> None:
    """Declare ``label_field`` again if a concurrent run dropped it from the dataset's schema.

    FiftyOne saves a dataset's list of fields as a whole, so two processes that add fields
    at the same moment can drop one of them: its values stay in the samples, unseen.
    """
    from fiftyone.core.odm import get_db_conn

    # Ask the database (not dataset.reload(), which also reloads every Sample held in memory).
    stored = get_db_conn().datasets.find_one({"name": dataset.name}, {"sample_fields.name": 1}) or {}
    if label_field in {f.get("name") for f in stored.get("sample_fields", [])}:
        return
    dataset.reload()
    _declare_field(dataset, label_field)
