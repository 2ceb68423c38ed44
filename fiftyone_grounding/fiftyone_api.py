"""The few things fiftyone-grounding needs from FiftyOne that FiftyOne has no public name for,
each in one function, so that a FiftyOne release that renames one breaks one place (FiftyOne
1.22: ``SampleCollection._root_dataset``, ``Dataset._doc``, the ``datasets`` collection)."""

from __future__ import annotations


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
