"""The few things fiftyone-grounding needs from FiftyOne that FiftyOne has no public name for,
each in one function, so that a FiftyOne release that renames one breaks one place (FiftyOne
1.22: ``SampleCollection._root_dataset``, ``Dataset._doc``, the ``datasets`` collection,
``SampleCollection._aggregate``, the names of ``compute_embeddings`` and ``apply_model`` in
``fiftyone.core.models``)."""

from __future__ import annotations

import inspect
from typing import Iterator


def is_collection(samples) -> bool:
    """Whether ``samples`` is a FiftyOne dataset or view (training also takes plain records)."""
    return hasattr(samples, "_root_dataset")


def root_dataset(samples):
    """The dataset that ``samples`` (a dataset or any view of one) reads and writes."""
    return samples._root_dataset


def dataset_id(dataset):
    """The dataset's database id (an ObjectId), which FiftyOne's own panels key their execution
    stores by."""
    return dataset._doc.id


def stored_field_names(dataset) -> set[str]:
    """The sample fields the database lists for ``dataset`` now, read without reloading the
    dataset (``dataset.reload()`` also reloads every sample held in memory)."""
    from fiftyone.core.odm import get_db_conn

    stored = get_db_conn().datasets.find_one({"name": dataset.name}, {"sample_fields.name": 1}) or {}
    return {f.get("name") for f in stored.get("sample_fields", [])}


def stream_by_filepath(view, fields: tuple[str, ...] = (), page: int = 32768) -> Iterator[tuple]:
    """``(sample id, filepath, *fields)`` of every sample of ``view``, in filepath order (an
    image's samples next to each other), read a page of about ``page`` samples at a time: memory
    holds one page whatever the size of the view (``view.values`` holds every value at once).
    Each page is its own query, from where the last one ended (keyset paging on the file path,
    whole images per page), so no database cursor waits, and times out, while the caller works.
    ``fields``: top-level sample fields (a missing value reads as None)."""
    project = {"filepath": 1, **{field: 1 for field in fields}}
    after = None
    while True:
        part = view if after is None else view.match({"filepath": {"$gt": after}})
        docs = list(part.sort_by("filepath").limit(page)._aggregate(post_pipeline=[{"$project": project}]))
        if not docs:
            return
        last, full = docs[-1]["filepath"], len(docs) == page
        if full:  # the last image may go on in the next page: read it whole now
            docs = [d for d in docs if d["filepath"] != last]
            docs += list(view.match({"filepath": last})._aggregate(post_pipeline=[{"$project": project}]))
        for doc in docs:
            yield (str(doc["_id"]), doc["filepath"], *(doc.get(field) for field in fields))
        if not full:
            return
        after = last


def fiftyone_is_embedding() -> bool:
    """Whether the caller is FiftyOne's ``compute_embeddings`` (which FiftyOne Brain's
    ``compute_similarity``, ``compute_visualization`` and ``compute_uniqueness`` call) rather
    than its ``apply_model``: both build a model's data-loader item with the same
    ``build_get_item(field_mapping)`` call and nothing else tells them apart before the run.
    Read from the calling functions, so a FiftyOne release that renames them makes an embedding
    run ask for a phrase (a loud error), never a prediction run go without one."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_globals.get("__name__") == "fiftyone.core.models":
                if frame.f_code.co_name == "compute_embeddings":
                    return True
                if frame.f_code.co_name == "apply_model":
                    return False
            frame = frame.f_back
        return False
    finally:
        del frame  # a frame held in a local keeps every caller's locals alive
