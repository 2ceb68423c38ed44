"""The original REFER and gRefCOCO release files, read without trusting them.

The REFER release (``refcoco/``, ``refcoco+/``, ``refcocog/``) holds, per variant, COCO's
``instances.json`` (images, annotations with pixel xywh boxes, categories; only the images and
objects the refs use) and one refs file per split partition: ``refs(unc).p`` (RefCOCO,
RefCOCO+), ``refs(umd).p`` (RefCOCOg's UMD partition) and ``refs(google).p`` (the Google
partitions, whose train and val share images; never used here). A refs file is a Python pickle
of a list of plain dicts (``ref_id``, ``ann_id``, ``image_id``, ``split``, ``sentences`` as
``{raw, sent, sent_id, tokens}``, ``sent_ids``, ``category_id``, ``file_name``).

gRefCOCO (CVPR 2023) has the same layout with ``grefs(unc).json``: a ref's ``ann_id`` and
``category_id`` may be lists (several objects), and a ref that refers to nothing has
``ann_id == [-1]``.

Unpickling a file can run any code it names, so :func:`load_refs_pickle` uses
:class:`RestrictedUnpickler`: it builds the containers, numbers and strings that the pickle
opcodes make by themselves and refuses every class or function the file asks for (the only way a
pickle runs code), before anything is called.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import SourceError

INSTANCES = "instances.json"
# The refs file of each variant: the partition whose splits the papers report.
SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "grefcoco": "unc"}
_REFS_FILE = re.compile(r"^(g?refs)\((\w+)\)\.(p|json)$")
_GOOGLE = (
    "the Google partition (refs(google).p) shares images between its train and val splits, so "
    "its scores are not comparable and it is never used"
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only what pickle opcodes make without a global lookup: dicts,
    lists, tuples, sets, strings, bytes, numbers, booleans and None.

    Everything else (a class instance, a function, ``__reduce__``'s callable, an extension
    code) goes through :meth:`find_class`, which refuses it; nothing named by the file is
    imported or called.
    """

    def __init__(self, file, path: str):
        # Python 2 wrote the REFER pickles: its byte strings are text (UTF-8) here.
        super().__init__(file, encoding="utf-8")
        self.path = path

    def find_class(self, module: str, name: str):
        raise SourceError(
            f"{self.path} asks to load {module}.{name}, but a refs file holds only lists, dicts, "
            "strings and numbers; it is refused and nothing from it was run. Use the refs file "
            "of the REFER release as downloaded."
        )

    def persistent_load(self, pid):
        raise SourceError(f"{self.path} holds a persistent id, which a refs file never does; it is refused.")


def load_refs_pickle(path) -> list:
    """The list of ref dicts in a REFER ``refs(*).p`` file, read with :class:`RestrictedUnpickler`."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            refs = RestrictedUnpickler(f, path).load()
    except UnicodeDecodeError as err:
        raise SourceError(f"{path} holds text that is not UTF-8 ({err}); it is not a REFER refs file.") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, MemoryError, RecursionError) as err:  # what malformed opcodes raise
        raise SourceError(
            f"{path} is not a whole refs pickle ({type(err).__name__}: {err}); it may be truncated: "
            "download the REFER release again."
        ) from err
    return _check_refs(refs, path)


def load_refs_json(path: str) -> list:
    """The list of ref dicts in a gRefCOCO ``grefs(*).json`` file."""
    return _check_refs(_load_json(path), os.fspath(path))


def _load_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise SourceError(f"{path} is not valid JSON ({err}); it may be truncated: download it again.") from err


_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences", "category_id")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ids(value) -> bool:
    """An id, or a non-empty list of ids (gRefCOCO's ann_id and category_id)."""
    return _is_int(value) or (isinstance(value, list) and bool(value) and all(_is_int(v) for v in value))


def _check_ref(ref) -> Optional[str]:
    """What is wrong with one ref's form, or None."""
    missing = [k for k in _REF_KEYS if not isinstance(ref, dict) or k not in ref]
    if missing:
        return f"lacks {missing} (a ref has {list(_REF_KEYS)})"
    if not (_is_int(ref["ref_id"]) and _is_int(ref["image_id"]) and _ids(ref["ann_id"]) and _ids(ref["category_id"])):
        return "ref_id and image_id must be integers, ann_id and category_id integers or lists of them"
    if not isinstance(ref["split"], str):
        return "split must be a string"
    sentences = ref["sentences"]
    if not isinstance(sentences, list) or not all(
        isinstance(s, dict) and _is_int(s.get("sent_id")) and isinstance(s.get("raw", s.get("sent", "")), str)
        for s in sentences
    ):
        return "sentences must be a list of {raw, sent, sent_id, tokens} records"
    sent_ids = ref.get("sent_ids")
    if sent_ids is not None and not (isinstance(sent_ids, list) and all(_is_int(v) for v in sent_ids)):
        return "sent_ids must be a list of integers"
    return None


def _check_refs(refs, path: str) -> list:
    if not isinstance(refs, list):
        raise SourceError(f"{path} holds a {type(refs).__name__}, not the list of refs a refs file holds.")
    for i, ref in enumerate(refs):
        problem = _check_ref(ref)
        if problem:
            raise SourceError(f"{path}: ref {i} {problem}: {ref!r:.200}")
    return refs


@dataclass
class Instances:
    """The index of a COCO ``instances.json``: images and annotations by id, category names."""

    images: dict  # image id -> COCO image record
    annotations: dict  # annotation id -> COCO annotation
    categories: dict  # category id -> name
    path: str


def load_instances(path: str) -> Instances:
    """Index a COCO-format ``instances.json`` (images, annotations, categories)."""
    path = os.fspath(path)
    data = _load_json(path)
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise SourceError(
            f"{path} lacks {missing}; it must be COCO's instances.json (images, annotations, categories)."
        )
    try:
        return Instances(
            images={int(im["id"]): im for im in data["images"]},
            annotations={int(a["id"]): a for a in data["annotations"]},
            categories={int(c["id"]): str(c["name"]) for c in data["categories"]},
            path=path,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise SourceError(f"{path}: a COCO image, annotation or category without an id ({err!r}).") from err


@dataclass(frozen=True)
class ReferFolder:
    """A folder of the REFER or gRefCOCO release, as found on disk."""

    folder: str
    kind: str  # "refer" or "grefcoco"
    refs_path: str
    instances_path: str
    split_by: str


def refs_files(folder: str) -> dict:
    """``{(stem, split_by): file name}`` of the refs files in ``folder`` (``refs``/``grefs``)."""
    if not os.path.isdir(folder):
        return {}
    found = {}
    for entry in sorted(os.listdir(folder)):
        match = _REFS_FILE.match(entry)
        if match:
            found.setdefault((match.group(1), match.group(2)), entry)
    return found


def is_refer_folder(folder) -> bool:
    """True where ``folder`` holds ``instances.json`` and a REFER or gRefCOCO refs file."""
    folder = os.fspath(folder)
    return os.path.isfile(os.path.join(folder, INSTANCES)) and bool(refs_files(folder))


def find_refer_folder(folder, name: str) -> Optional[str]:
    """``folder`` itself when it is a REFER / gRefCOCO folder, else its subfolder named for the
    variant (the release's ``data/`` holds ``refcoco/``, ``refcoco+/``, ``refcocog/``), else None."""
    folder = os.fspath(folder)
    for candidate in (folder, os.path.join(folder, name)):
        if is_refer_folder(candidate):
            return candidate
    return None


def open_refer_folder(folder: str, name: str) -> ReferFolder:
    """The refs and instances files of variant ``name`` in a REFER / gRefCOCO folder.

    RefCOCO and RefCOCO+ use ``refs(unc).p``, RefCOCOg ``refs(umd).p``, gRefCOCO
    ``grefs(unc).json``; a folder with only the Google partition is refused.
    """
    files = refs_files(folder)
    stem = "grefs" if name == "grefcoco" else "refs"
    other = "refs" if stem == "grefs" else "grefs"
    split_by = SPLIT_BY[name]
    if (stem, split_by) not in files:
        if any(s == other for s, _ in files):
            kind = "gRefCOCO (grefs(unc).json)" if other == "grefs" else "REFER (refs(...).p)"
            use = "grefcoco" if other == "grefs" else "refcoco, refcoco+ or refcocog"
            raise SourceError(f"{folder} is a {kind} folder, not {name}'s; import it as {use}.")
        if (stem, "google") in files:
            raise SourceError(
                f"{folder} has only {files[(stem, 'google')]}: {_GOOGLE}. Use the {name} folder of "
                f"the REFER release with its {stem}({split_by}) file."
            )
        raise SourceError(
            f"{folder} has no {stem}({split_by}) file (it has {sorted(files.values())}); {name} "
            f"needs {stem}({split_by}).{'json' if stem == 'grefs' else 'p'} beside {INSTANCES}."
        )
    return ReferFolder(
        folder=folder,
        kind="grefcoco" if stem == "grefs" else "refer",
        refs_path=os.path.join(folder, files[(stem, split_by)]),
        instances_path=os.path.join(folder, INSTANCES),
        split_by=split_by,
    )


def load_refs(found: ReferFolder) -> list:
    """The refs of a found folder: the restricted unpickler for ``.p``, JSON for ``.json``."""
    if found.refs_path.endswith(".p"):
        return load_refs_pickle(found.refs_path)
    return load_refs_json(found.refs_path)
