"""The fast apply path: a grounding model over a whole view, written back in bulk.

:func:`apply_grounding_model` (each sample's own phrase) and :func:`ground_phrase` (one typed
phrase for every image; ``search.search_phrase`` ranks by it) share one loop: one query for ids,
paths and phrases, samples grouped by image wherever they are in the view, batches packed by
image (from pixels, or from a feature cache's frozen features), one batch in flight on a GPU,
and a :class:`LabelWriter` that writes the labels by sample id in the background, so an
interrupted run keeps what it wrote. Each written field is recorded on the dataset with the
checkpoint that wrote it (``runs.record_labels``).
"""

from __future__ import annotations

import collections
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional

import torch

from ..data.batching import GroupBatchSampler
from ..devices import WORKER_TYPES, default_apply_batch_size, default_num_workers, on_device
from ..data.fields import DEFAULT_PROMPT_FIELD, GROUNDED_FIELD
from ..errors import InputError
from .model import GroundingModel, log_skipped
from .items import collate_items
from .postprocess import batch_labels
from ..data.images import resized_pixels
from ..data.labels import LabelMaker
from ..progress import TimeLeft, fiftyone_progress, shows_progress
from ..runs import record_labels
from ..data.text import NO_PHRASE, clean_phrase
from ..fiftyone_api import root_dataset, stored_field_names, stream_by_filepath
from .distributed import first_rank_first, process_group, shard_of


class LabelWriter:
    """Writes labels into ``dataset.<label_field>`` by sample id, ``chunk_size`` at a time, from
    one background thread (as FiftyOne's ``apply_model`` does with ``async_writes``), so the loop
    that feeds a GPU does not wait for the database (60-110 us per sample).

    Labels go in database form (``LabelMaker.doc``) with ``validate=False``; the field
    must be declared as ``Detections`` first (:func:`declare_detections_field`). A failed write
    is raised by the next :meth:`add` or by :meth:`close`; :meth:`close` (also on leaving a
    ``with`` block, error or not) writes everything kept before it returns.
    """

    def __init__(self, dataset, label_field: str, chunk_size: int = 1024):
        self.dataset = dataset
        self.label_field = label_field
        self.chunk_size = chunk_size
        self._pending: dict = {}
        self._writing: Optional[Future] = None  # the chunk being written
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fiftyone-grounding-write")

    def add(self, ids: Iterable[str], labels: Iterable) -> None:
        """Keep the labels that are not None; hand a full chunk to the background thread."""
        for sid, label in zip(ids, labels):
            if label is not None:
                self._pending[sid] = label
        if len(self._pending) >= self.chunk_size:
            self.flush()

    def _write(self, chunk: dict) -> None:
        self.dataset.set_values(self.label_field, chunk, key_field="id", validate=False)

    def flush(self, wait: bool = False) -> None:
        """Hand the labels kept to the writer (one chunk at a time: waits for the previous one
        and raises its error here); ``wait``: write them in this thread."""
        previous, self._writing = self._writing, None
        try:
            if previous is not None:
                previous.result()
        finally:  # even if that chunk failed: do not drop these
            if self._pending:
                chunk, self._pending = self._pending, {}
                if wait:
                    self._write(chunk)
                else:
                    self._writing = self._pool.submit(self._write, chunk)

    def close(self) -> None:
        try:
            self.flush(wait=True)
        finally:
            self._pool.shutdown(wait=True)  # also a chunk whose wait was interrupted

    def __enter__(self) -> "LabelWriter":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


class ImageGroups(torch.utils.data.Dataset):
    """Inference items are images: each decoded and resized once (or its frozen features read
    from ``features``, a feature cache holding every one of them), with its samples' phrases."""

    def __init__(self, groups: list[tuple[str, list[tuple[str, str]]]], image_size: int, features=None):
        self.groups = groups  # [(filepath, [(sample id, phrase), ...]), ...]
        self.image_size = image_size
        self.features = features

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[dict]:
        path, members = self.groups[index]
        if self.features is not None:
            image = {"image_features": self.features.get(path, 0)}  # (N, D) float16, the unmirrored view
            error = None
        else:
            pixels, error = resized_pixels(path, self.image_size)
            image = {"pixel_values": pixels}
        return [{"id": sid, "filepath": path, "phrase": phrase, "error": error, **image} for sid, phrase in members]


def collate_groups(groups: list[list[dict]]) -> dict:
    return {**collate_items([item for group in groups for item in group]), "images": len(groups)}


def thread_loader(items: ImageGroups, batches, threads: int, prefetch: int = 4):
    """Collated batches of ``items`` in order, their images decoded by a pool of ``threads``
    threads up to ``prefetch`` batches ahead (0 threads: in the calling thread).

    PIL decodes and OpenCV resizes without the GIL, so threads decode in parallel like
    DataLoader processes, but nothing is started or forked: no start-up cost, no copy of a
    process that holds the model and a CUDA context, and it may run inside the App's server.
    """
    if threads == 0:
        for indices in batches:
            yield collate_groups([items[i] for i in indices])
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
            yield collate_groups([f.result() for f in futures])
    finally:  # also when the caller stops early (an error, Ctrl-C): drop the queued images
        pool.shutdown(wait=True, cancel_futures=True)


def _loader(items: ImageGroups, batch_size: int, model: GroundingModel, num_workers: Optional[int],
            worker_type: str):
    batches = GroupBatchSampler([len(m) for _, m in items.groups], batch_size, shuffle=False)
    workers = default_num_workers(model.device) if num_workers is None else num_workers
    if worker_type == "thread":
        return thread_loader(items, batches, workers)  # predict_boxes pins the pixels
    workers = min(workers, len(batches))  # a few selected samples start no idle processes
    loader = torch.utils.data.DataLoader(
        items, batch_sampler=batches, num_workers=workers, collate_fn=collate_groups,
        pin_memory=model.device.type == "cuda", prefetch_factor=4 if workers else None,
    )
    with on_device(model.device):  # its pin-memory thread pins for the model's GPU, not the current one
        return iter(loader)


# Phrases held in memory at once: a view is read in pages and run in chunks of whole images
# (fiftyone_api.stream_by_filepath), so memory is bounded by this, not by the size of the view.
ROWS_PER_CHUNK = 32768


def chunks_of_whole_images(rows: Iterable[tuple], chunk_rows: int = ROWS_PER_CHUNK) -> Iterator[list[tuple]]:
    """``rows`` (in filepath order) cut into lists of at least ``chunk_rows`` rows (the last one
    may be shorter) that never split an image's rows."""
    chunk: list[tuple] = []
    for row in rows:
        if len(chunk) >= chunk_rows and row[1] != chunk[-1][1]:
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk


def _batches(chunks: Iterable[list[tuple]], model: GroundingModel, batch_size: int, num_workers: Optional[int],
             worker_type: str, features, skipped: list):
    """Collated batches of each chunk's images (those a feature cache holds first, read from it;
    then the others, decoded); rows without a phrase go to ``skipped``. Each chunk's loader is
    closed when it is done, or when the caller stops early (``close()`` on this generator)."""
    for chunk in chunks:
        groups: dict[str, list[tuple[str, str]]] = {}
        for sid, path, phrase in chunk:
            text = clean_phrase(phrase)
            if text is None:
                skipped.append((sid, NO_PHRASE))
            else:
                groups.setdefault(path, []).append((sid, text))
        cached = [g for g in groups.items() if features is not None and g[0] in features]
        decoded = [g for g in groups.items() if features is None or g[0] not in features]
        for part, source in ((cached, features), (decoded, None)):
            if not part:
                continue
            loader = _loader(ImageGroups(part, model.config.image_size, source), batch_size, model, num_workers,
                             worker_type)
            try:
                yield from loader
            finally:
                if hasattr(loader, "close"):
                    loader.close()


def _count(rows: Iterable[tuple], features=None) -> tuple[int, int, int, int]:
    """(rows, rows with a phrase, images with a phrase, those of them in ``features``) of ``rows``
    in filepath order."""
    total = phrases = images = cached = 0
    last = None
    for _, path, phrase in rows:
        total += 1
        if clean_phrase(phrase) is not None:
            phrases += 1
            if path != last:
                images += 1
                cached += features is not None and path in features
            last = path
    return total, phrases, images, cached


def _ground(view, model: GroundingModel, label_field: str, rows: Callable[[], Iterable[tuple]], *,
            batch_size: Optional[int] = None, num_workers: Optional[int] = None,
            worker_type: str = WORKER_TYPES[0], progress=None, progress_callback=None, write_every: int = 1024,
            overlap: Optional[bool] = None, confidence_thresh: Optional[float] = None, features=None,
            record: Optional[dict] = None, distributed=False) -> dict:
    """Predict and write a box for each ``(sample id, filepath, phrase)`` that ``rows()`` yields in
    filepath order (called twice: to count, then to run); the loop that the public functions run.
    ``features``: a feature cache; the images it holds are read from it, the others decoded.
    ``record``: how the phrases were chosen, recorded on the dataset with the model's checkpoint
    (None: not recorded). ``distributed``: run this rank's images only (``distributed.py``).
    Returns ``{"processed", "skipped"}`` (of this rank; with ``"ranks"``: every rank's counts)."""
    if batch_size is None:
        batch_size = default_apply_batch_size(model.device)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if worker_type not in WORKER_TYPES:
        raise InputError(f"worker_type must be one of {', '.join(WORKER_TYPES)}, got {worker_type!r}")
    shard = shard_of(distributed)

    def mine() -> Iterator[tuple]:
        return (row for row in rows() if shard.owns(row[1]))

    dataset = root_dataset(view)
    with process_group(shard) as group:
        total, phrases, images, cached = _count(mine(), features)
        if total or shard.distributed:
            first_rank_first(group, _declare_on, dataset, label_field, shard)
        run = {"processed": 0, "skipped": []}
        if total:
            run = _run(dataset, model, label_field, mine(), (total, phrases, images, cached), shard,
                       batch_size=batch_size, num_workers=num_workers, worker_type=worker_type, progress=progress,
                       progress_callback=progress_callback, write_every=write_every, overlap=overlap,
                       confidence_thresh=confidence_thresh, features=features)
        counts = group.gather({"processed": run["processed"], "skipped": len(run["skipped"])})
        if shard.distributed:
            run["ranks"] = counts
        if shard.rank == 0 and sum(c["processed"] for c in counts):
            _redeclare_if_dropped(dataset, label_field)
            if record is not None:
                written_from = model.labels.confidence_thresh if confidence_thresh is None else confidence_thresh
                record_labels(view, label_field, model.source, **record, score_thresh=model.applied_score_thresh,
                              confidence_thresh=written_from)
    return run


def _declare_on(dataset, label_field: str, shard) -> None:
    if shard.rank != 0:
        dataset.reload()  # the field rank 0 declared
    declare_detections_field(dataset, label_field)


def _run(dataset, model: GroundingModel, label_field: str, rows: Iterable[tuple], counts: tuple, shard, *,
         batch_size: int, num_workers: Optional[int], worker_type: str, progress,
         progress_callback, write_every: int, overlap: Optional[bool], confidence_thresh: Optional[float],
         features) -> dict:
    import fiftyone.core.utils as fou

    total, phrases, images, cached = counts
    skipped: list[tuple[str, str]] = []
    loader = _batches(chunks_of_whole_images(rows), model, batch_size, num_workers, worker_type, features, skipped)
    if overlap is None:
        overlap = model.device.type == "cuda"
    done = 0
    verbose = shows_progress(progress)  # what it will run, and how long it will take, on stdout
    if verbose and phrases:
        print(_plan(model, phrases, images, cached, batch_size, shard), flush=True)
    time_left = TimeLeft(images, unit="images")
    in_flight = None  # (batch, its pending boxes): queued on the device, not written yet

    make_label = model.labels.doc if confidence_thresh is None else LabelMaker(
        model.labels.label, confidence_thresh).doc

    def labels_of(batch, pending) -> list:
        return batch_labels(batch, pending.result() if pending is not None else None, make_label)

    with model, on_device(model.device), fiftyone_progress(progress, "grounding") as bar_progress, \
            fou.ProgressBar(total=total, progress=bar_progress) as bar, \
            LabelWriter(dataset, label_field, write_every) as writer:

        def settle() -> None:
            """Write the labels of the batch in flight and count it as done."""
            nonlocal in_flight, done
            (batch, pending), in_flight = in_flight, None
            writer.add(batch["ids"], labels_of(batch, pending))
            done += batch["size"]
            estimate = time_left.add(batch["images"])
            if estimate is not None and verbose:
                print(estimate, flush=True)
            bar.update(batch["size"])
            if progress_callback is not None:
                left = time_left.left()
                progress_callback(done / total, f"{done:,} of {total:,} samples" + (f", {left}" if left else ""))

        try:
            # One batch in flight on a GPU: while it runs batch k, the host queues batch k + 1
            # and writes the labels of batch k - 1. Labels in database form: building FiftyOne
            # objects costs more than the model.
            for batch in loader:
                skipped.extend(batch["errors"])
                queued = (batch, model.predict_boxes(batch["pixel_values"], batch["phrases"], batch["image_index"],
                                                     image_features=batch["image_features"])
                          if batch["valid"] else None)
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
                    writer.add(in_flight[0]["ids"], labels_of(*in_flight))
            finally:
                loader.close()
        bar.update(total - done)  # the rows without a phrase
        if progress_callback is not None and done < total:
            progress_callback(1.0, f"{total:,} of {total:,} samples")
    log_skipped(skipped)
    return {"processed": total, "skipped": skipped}


def _plan(model: GroundingModel, phrases: int, images: int, cached: int, batch_size: int, shard) -> str:
    """``"Grounding 2,468 phrases in 1,234 images (tiny, cpu, batch 64)"``."""
    name = model.config.preset if model.config.preset != "custom" else model.config.architecture
    details = [name, str(model.device), f"batch {batch_size:,}"]
    if cached:
        details.append(f"{cached:,} images from the feature cache")
    where = f"{shard}: " if shard.distributed else ""
    return (f"{where}Grounding {phrases:,} phrase{'s' if phrases != 1 else ''} in {images:,} "
            f"image{'s' if images != 1 else ''} ({', '.join(details)})")


def apply_grounding_model(view, model: GroundingModel, label_field: str = "predictions",
                          prompt_field: Optional[str] = None, batch_size: Optional[int] = None,
                          num_workers: Optional[int] = None, worker_type: str = WORKER_TYPES[0],
                          skip_existing: bool = False, progress: Optional[bool] = None,
                          progress_callback: Optional[Callable[[float, str], None]] = None,
                          write_every: int = 1024, overlap: Optional[bool] = None,
                          confidence_thresh: Optional[float] = None, distributed=False) -> dict:
    """Predict a box for every sample of ``view`` from its own phrase in ``prompt_field`` and
    write it to ``label_field`` (one ``Detections``); the fast path behind the CLI and the
    operators, equal in result to ``view.apply_model(model, label_field, prompt_field=...)``.

    - ``prompt_field`` (default: the model's load-time phrase source, else ``"expression"``): a
      model loaded with ``prompt="..."`` and no ``prompt_field`` here grounds that one phrase
      in every image, as :func:`ground_phrase` does.

    - Reads ids, file paths and phrases from one database cursor in filepath order, in chunks of
      whole images (memory is bounded by a chunk, ``ROWS_PER_CHUNK`` phrases, not by the view),
      groups the samples by image (each image decoded and encoded once per batch), runs
      batches of about ``batch_size`` phrases (default: ``default_apply_batch_size``,
      256 on a GPU, 64 on the CPU), and writes the labels in bulk by sample id every
      ``write_every`` samples from a background thread, so an interrupted run keeps what it
      wrote. Every chunk is written before the call returns or raises.
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
    - Unless ``progress`` is False (None follows ``fo.config.show_progress_bars``), prints what it
      will run (phrases, images, model, device, batch size) and, once the first batches measured
      it, the time it will take (``progress.TimeLeft``); outside a terminal, lines instead of a
      bar (``progress.fiftyone_progress``). ``progress_callback``'s label carries the time left.
    - ``confidence_thresh`` (default: the model's own, usually none) works as in FiftyOne's
      ``apply_model``: a box less confident than it is dropped, the sample gets an empty
      ``Detections``.

    - ``distributed``: under ``torchrun`` / ``accelerate launch``, this process runs only its
      rank's images (``distributed.py``: an image's phrases on one rank, on ``cuda:LOCAL_RANK``
      unless the model is elsewhere); with ``skip_existing`` a rerun finishes what a dead rank left.

    Returns ``{"processed": number of samples run, "skipped": [(sample id, reason), ...]}`` (this
    rank's; distributed, also ``"ranks"``: every rank's ``{"processed", "skipped"}`` counts).
    """
    todo = view.exists(label_field, False) if skip_existing and view.has_field(label_field) else view
    if prompt_field is None and model.prompt is not None and model.prompt_field is None:
        def rows():
            return ((sid, path, model.prompt) for sid, path in stream_by_filepath(todo))

        record = {"phrase": model.prompt}
    else:
        prompt_field = prompt_field or model.prompt_field or DEFAULT_PROMPT_FIELD
        if not todo.has_field(prompt_field):
            raise InputError(f"The view has no field {prompt_field!r} with the phrases; pass prompt_field=")

        def rows():
            return stream_by_filepath(todo, (prompt_field,))

        record = {"prompt_field": prompt_field}
    return _ground(view, model, label_field, rows, batch_size=batch_size, num_workers=num_workers,
                   worker_type=worker_type, progress=progress, progress_callback=progress_callback,
                   write_every=write_every, overlap=overlap, confidence_thresh=confidence_thresh, record=record,
                   distributed=distributed)


def ground_phrase(view, phrase: str, model: GroundingModel, label_field: str = GROUNDED_FIELD,
                  batch_size: Optional[int] = None, progress: Optional[bool] = None,
                  progress_callback: Optional[Callable[[float, str], None]] = None,
                  confidence_thresh: Optional[float] = None, features=None, record: bool = True,
                  distributed=False) -> int:
    """Find one typed ``phrase`` in every image of ``view``; writes its boxes as a ``Detections``
    each (one box, or a multi-box model's zero or more; an unreadable image gets none, and loses
    what the field held).

    ``features``: a feature cache to read the images it holds from (``search.search_phrase``
    passes one); ``record=False``: do not record the field on the dataset (the panel's preview);
    ``distributed``: this rank's images only (see :func:`apply_grounding_model`).
    Returns how many boxes were written (in the whole view) (``confidence_thresh`` drops the less confident ones).
    """
    text = clean_phrase(phrase)
    if text is None:
        raise InputError("The phrase is empty: type what to find, e.g. 'the red circle on the left'.")

    def rows():
        return ((sid, path, text) for sid, path in stream_by_filepath(view))

    run = _ground(view, model, label_field, rows, batch_size=batch_size, progress=progress,
                  progress_callback=progress_callback, confidence_thresh=confidence_thresh, features=features,
                  record={"phrase": text} if record else None, distributed=distributed)
    if run["skipped"]:  # no stale box of another phrase on the samples that got none
        root_dataset(view).set_values(label_field, {sid: None for sid, _ in run["skipped"]}, key_field="id")
    return view.count(f"{label_field}.detections")


def declare_detections_field(dataset, label_field: str) -> None:
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
        raise InputError(
            f"The field {label_field!r} already holds {kind}, not Detections: choose another label field, "
            f"or delete it first with dataset.delete_sample_field({label_field!r})")


def _redeclare_if_dropped(dataset, label_field: str) -> None:
    """Declare ``label_field`` again if a concurrent run dropped it from the dataset's schema.

    FiftyOne saves a dataset's list of fields as a whole, so two processes that add fields
    at the same moment can drop one of them: its values stay in the samples, unseen.
    """
    if label_field in stored_field_names(dataset):
        return
    dataset.reload()
    declare_detections_field(dataset, label_field)
