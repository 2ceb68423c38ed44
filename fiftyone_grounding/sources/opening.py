"""Which source the user's arguments name: :func:`open_source` turns a name, a ``source`` (None for
the Hub, a folder, a ``DatasetDict``, a dict per variant) and a revision into a ``base.Source``."""

from __future__ import annotations

import os

from ..errors import InputError, SourceError
from . import refer
from .base import COMBINED, GREFCOCO, HUB_IDS, REFCOCO_M, SOURCE_REVISIONS, VARIANTS, Source, check_name
from .combined import CombinedSource
from .jxu124 import JxuSource, load_source
from .refer_source import download_grefcoco, open_refer


def open_source(name: str, source=None, revision=None) -> Source:
    """The :class:`Source` of ``name`` from what the user passed.

    - ``refcoco`` / ``refcoco+`` / ``refcocog``: None (jxu124 on the Hub), a ``save_to_disk``
      folder or ``DatasetDict``, or a REFER folder (``instances.json`` + ``refs(unc|umd).p``, or
      the release's ``data/`` folder above it), told apart by its contents;
    - ``grefcoco``: None (``FudanCVL/gRefCOCO`` on the Hub) or a folder with ``grefs(unc).json``
      and ``instances.json``;
    - ``refcocox``: None (the three from the Hub), a folder holding one source folder per variant
      (``refcoco/``, ``refcoco+/`` or ``refcocoplus/``, ``refcocog/``: REFER or ``save_to_disk``),
      or a dict ``{variant: source}``; ``revision`` a dict ``{variant: revision}``.
    """
    check_name(name)
    if name == COMBINED:
        return _open_combined(source, revision)
    if name == REFCOCO_M:
        raise InputError(
            "RefCOCO-M is a FiftyOne dataset, not a table source; import it with import_refcoco('refcoco-m')."
        )
    if isinstance(revision, dict):
        raise InputError(f"revision must be a single Hub revision for {name}, e.g. 'main'.")
    if name == GREFCOCO:
        if source is None:
            hub_id = HUB_IDS[GREFCOCO]
            revision = revision or SOURCE_REVISIONS[hub_id]
            return open_refer(name, download_grefcoco(revision), origin=hub_id, hub_id=hub_id, revision=revision)
        return open_refer(name, source)
    if isinstance(source, (str, os.PathLike)) and refer.find_refer_folder(source, name):
        return open_refer(name, source)
    dsd = load_source(name, source, revision)
    origin = HUB_IDS[name] if source is None else (
        os.path.abspath(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    return JxuSource(name, dsd, origin, revision)


def _open_combined(source, revision) -> CombinedSource:
    if revision is not None and not isinstance(revision, dict):
        raise InputError(
            "refcocox combines three Hub datasets: pass revision={'refcoco': ..., 'refcoco+': ..., 'refcocog': ...} "
            "or leave it out for the tested defaults."
        )
    revisions = revision or {}
    if source is None or isinstance(source, dict):
        given = source or {}
        unknown = sorted(set(given) - set(VARIANTS))
        if unknown:
            raise InputError(f"refcocox combines {list(VARIANTS)}; unknown source key(s) {unknown}.")
        sources = {v: given.get(v) for v in VARIANTS}
    else:
        root = os.fspath(source)
        sources = {}
        for variant in VARIANTS:
            names = [variant] + (["refcocoplus"] if variant == "refcoco+" else [])
            found = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
            if found is None:
                raise SourceError(
                    f"{root} has no {' or '.join(names)} folder; refcocox needs one source folder per variant "
                    f"({', '.join(VARIANTS)}): REFER folders (the release's data/) or save_to_disk copies."
                )
            sources[variant] = found
    parts = {v: open_source(v, sources[v], revisions.get(v)) for v in VARIANTS}
    return CombinedSource(parts)
