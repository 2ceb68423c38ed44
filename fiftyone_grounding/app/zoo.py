"""This repository as a FiftyOne remote model-zoo source, and model lookup by path or zoo name.

``manifest.json`` at the repository root lists the models; the root ``__init__.py``
delegates FiftyOne's ``download_model`` / ``load_model`` calls to the functions here::

    import fiftyone.zoo as foz

    foz.register_zoo_model_source("https://github.com/<org>/fiftyone-grounding")
    model = foz.load_zoo_model("fiftyone-grounding/tiny-synthetic-demo", prompt_field="expression")
    dataset.apply_model(model, label_field="predictions")     # or prompt="the red car": one phrase for all

``foz.register_zoo_model_source`` only takes GitHub repositories and archive URLs;
offline, :func:`register_local_source` registers a local clone the same way. FiftyOne's
"Apply zoo model" operator asks for the phrase source through the root ``__init__.py``'s
``resolve_input`` / ``parse_parameters`` (built in ``zoo_form.zoo_model_inputs``).

Loaded networks are kept in this process by checkpoint (:func:`cached_model`, the
``MODEL_CACHE_SIZE`` most recently used): the App's operators and panel, and the zoo
hooks, start at once the second time; :func:`release_models` frees them.

Models (a trained checkpoint folder each: ``config.json`` + ``model.safetensors``):

- ``fiftyone-grounding/seed-refcoco``: the ``seed`` preset (Hub encoders), trained on RefCOCO;
  the Hugging Face Hub repository of the same name at the tag ``ZOO_REVISION``.
- ``fiftyone-grounding/grounder-refcoco``: the improved ``grounder`` preset; the Hub repository
  of the same name at that tag.
- ``fiftyone-grounding/tiny-synthetic-demo``: the checkpoint that ``fiftyone-grounding demo``
  writes, copied from ``$FIFTYONE_GROUNDING_DEMO_CHECKPOINT`` or, unset, the folder the demo
  recorded (:func:`demo_checkpoint_dir`).

The Hub repositories are fetched into the Hugging Face cache (``checkpoint.resolve_checkpoint_dir``,
which also reads that cache alone under ``HF_HUB_OFFLINE=1``) and linked or copied from there into
FiftyOne's model zoo folder. Any Hub repository of a checkpoint loads without the zoo, too:
``load_grounding_model("org/name")``.

The model the App's forms and the CLI offer when none is given is :func:`default_checkpoint`:
the latest training run's best checkpoint on the dataset, else the demo's. Every path is
absolute: the App's operators run in its server, whose working directory is not the user's.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..models.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, atomic_write_dir, hub_checkpoint,
                                 resolve_checkpoint_dir)
from ..models.calibration import CALIBRATION_NAME
from ..devices import resolve_device
from ..errors import CheckpointError, ConfigError, DownloadError, InputError

SOURCE_NAME = "fiftyone-grounding"
MANIFEST_NAME = "manifest.json"
# The tag of the Hub repositories' checkpoints that this version loads: a checkpoint pushed later
# (another format, another training) gets another tag, and installed versions keep theirs.
ZOO_REVISION = "v1"
DEMO_CHECKPOINT_ENV = "FIFTYONE_GROUNDING_DEMO_CHECKPOINT"
# where the demo records its checkpoint: FiftyOne's execution store (in its database, so the App's
# server, a notebook and the command line all read the same)
STORE_NAME = "fiftyone_grounding"
DEMO_CHECKPOINT_KEY = "demo_checkpoint"
# What a source folder holds for FiftyOne: the manifest, the module it imports, the package.
SOURCE_FILES = (MANIFEST_NAME, "__init__.py", "fiftyone_grounding")
# Path segments a manifest may use: no "..", no leading dot, no separators.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# Grounding networks kept loaded in one process (the App's server), by checkpoint: the operators,
# the panel and the zoo hooks reuse them, so a second run starts at once (release_models frees them).
MODEL_CACHE_SIZE = 2


@dataclass(frozen=True)
class ZooEntry:
    """Where a zoo model's checkpoint comes from: the Hugging Face Hub repository ``repo_id`` at
    ``revision``, or (``repo_id`` None) the local folder of the offline demo."""

    repo_id: Optional[str] = None
    revision: Optional[str] = None


MODELS: dict[str, ZooEntry] = {
    f"{SOURCE_NAME}/seed-refcoco": ZooEntry("fiftyone-grounding/seed-refcoco", ZOO_REVISION),
    f"{SOURCE_NAME}/grounder-refcoco": ZooEntry("fiftyone-grounding/grounder-refcoco", ZOO_REVISION),
    f"{SOURCE_NAME}/tiny-synthetic-demo": ZooEntry(),
}


def _entry(model_name: str) -> ZooEntry:
    base_name = model_name.split("@", 1)[0]  # FiftyOne appends "@<version>" to versioned names
    if base_name not in MODELS:
        raise InputError(f"Unknown fiftyone-grounding zoo model {model_name!r}; known: {sorted(MODELS)}")
    return MODELS[base_name]


def checkpoint_dir(model_path) -> Path:
    """The checkpoint folder of a zoo model whose FiftyOne model path is ``model_path``.

    FiftyOne counts a zoo model as downloaded when its path is a file or, for a path named
    like an archive, when the folder of the same name exists. A checkpoint is a folder, so
    ``manifest.json`` names each model ``<name>.tar.gz`` and the checkpoint lives in
    ``<name>/`` (nothing is archived): then re-loading does not download again, and
    ``foz.delete_zoo_model`` removes the folder.
    """
    import eta.core.utils as etau

    return Path(etau.split_archive(str(model_path))[0])


def _zoo_checkpoint_dir(model_path) -> Path:
    """``checkpoint_dir(model_path)``, refused unless it lies inside FiftyOne's model zoo folder
    (a manifest's ``base_filename`` such as ``../../x.tar.gz`` must not point elsewhere: the
    download replaces that folder)."""
    import fiftyone as fo

    target = checkpoint_dir(model_path)
    root = Path(fo.config.model_zoo_dir).expanduser().resolve()
    if root not in target.expanduser().resolve().parents:
        raise InputError(f"Refusing zoo model path {model_path}: it lies outside FiftyOne's model zoo folder "
                         f"{root}. The manifest's base_filename must be a plain file name such as 'name.tar.gz'.")
    return target


def validate_manifest(manifest) -> None:
    """Check a ``manifest.json`` (types, known model names, file names that stay in their folder)."""
    problems = []
    if not isinstance(manifest, dict):
        raise ConfigError(f"{MANIFEST_NAME} must hold a JSON object")
    name = manifest.get("name")
    if not isinstance(name, str) or not all(SAFE_NAME.fullmatch(part) for part in name.split("/")):
        problems.append(f"name {name!r} must be 'owner/name' made of letters, digits, '_', '.', '-'")
    if not isinstance(manifest.get("url"), (str, type(None))):
        problems.append("url must be a string or null")
    models = manifest.get("models")
    if not isinstance(models, list) or not models:
        problems.append("models must be a non-empty list")
        models = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict):
            problems.append(f"models[{i}] must be an object")
            continue
        if entry.get("base_name") not in MODELS:
            problems.append(f"models[{i}].base_name {entry.get('base_name')!r} is not one of {sorted(MODELS)}")
        filename = entry.get("base_filename")
        if not (isinstance(filename, str) and SAFE_NAME.fullmatch(filename) and filename.endswith(".tar.gz")):
            problems.append(f"models[{i}].base_filename {filename!r} must be a plain file name ending in .tar.gz")
        for key in ("version", "description", "source", "author", "license"):
            if not isinstance(entry.get(key), (str, type(None))):
                problems.append(f"models[{i}].{key} must be a string or null")
        tags = entry.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            problems.append(f"models[{i}].tags must be a list of strings")
    if problems:
        raise ConfigError(f"Invalid {MANIFEST_NAME}: " + "; ".join(problems))


def _store():
    from fiftyone.operators.store import ExecutionStore

    return ExecutionStore.create(STORE_NAME)


def record_demo_checkpoint(path) -> Path:
    """Record ``path`` (made absolute) as the demo's checkpoint, for every process on this database."""
    path = Path(path).expanduser().resolve()
    _store().set(DEMO_CHECKPOINT_KEY, str(path))
    return path


def demo_checkpoint_dir() -> Optional[Path]:
    """The offline demo's checkpoint: ``$FIFTYONE_GROUNDING_DEMO_CHECKPOINT`` (made absolute), else
    the folder ``fiftyone-grounding demo`` recorded, else None (no demo has run)."""
    given = os.environ.get(DEMO_CHECKPOINT_ENV) or _store().get(DEMO_CHECKPOINT_KEY)
    return Path(given).expanduser().resolve() if given else None


def default_checkpoint(dataset=None) -> Optional[str]:
    """The model to offer when none is named: the best checkpoint of the latest training run
    recorded on ``dataset`` that has one on disk (:func:`runs.training_checkpoints`), else the
    demo's checkpoint, by absolute path; None when neither exists."""
    from ..runs import training_checkpoints

    candidates = training_checkpoints(dataset) if dataset is not None else []
    for path in candidates + [demo_checkpoint_dir()]:
        try:
            if path is not None:
                return str(resolve_checkpoint_dir(path))
        except CheckpointError:  # deleted, or not written yet (a run before its first epoch)
            continue
    return None


NO_DEFAULT_MODEL = ("No model yet: type a checkpoint folder or a zoo model name, train one (Grounding: train a "
                    "model, or `fiftyone-grounding train`), or run `fiftyone-grounding demo`.")


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """The checkpoint's files (its calibration too, where it has one) into ``dst``: hard links
    where the file system allows (the Hugging Face cache's files are never written again, and a
    checkpoint folder is replaced whole, never edited), else copies."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME):
        source = (src / name).resolve()  # the cache's snapshot files are links to its blobs
        if not source.is_file():
            continue
        try:
            os.link(source, dst / name)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(source, dst / name)


def download_model(model_name: str, model_path: str) -> None:
    """Fetch ``model_name``'s checkpoint into ``checkpoint_dir(model_path)`` (FiftyOne's remote-zoo hook)."""
    entry = _entry(model_name)
    target = _zoo_checkpoint_dir(model_path)
    if entry.repo_id is None:
        src = demo_checkpoint_dir()
        try:
            if src is None:
                raise CheckpointError("no demo has recorded one")
            src = resolve_checkpoint_dir(src)
        except CheckpointError as e:
            raise DownloadError(
                f"No checkpoint to copy for {model_name} ({e}): run `fiftyone-grounding demo` first "
                f"or set {DEMO_CHECKPOINT_ENV} to a checkpoint folder."
            ) from None
    else:
        try:
            src = resolve_checkpoint_dir(entry.repo_id, revision=entry.revision)
        except CheckpointError as e:  # offline and not cached, not found, gated: one sentence that says what to do
            raise DownloadError(str(e)) from None
    atomic_write_dir(target, lambda tmp: _copy_checkpoint(src, tmp))


def load_model(model_name: str, model_path: str, device=None, **kwargs):
    """The ``GroundingModel`` of a downloaded zoo model (FiftyOne's remote-zoo hook).

    ``kwargs`` go to ``GroundingModel``: ``prompt_field="expression"`` (each sample's phrase) or
    ``prompt="the red car"`` (one phrase for every sample), ``confidence_thresh``,
    ``mixed_precision="bf16"``, ... The network comes from :func:`cached_model`.
    """
    _entry(model_name)
    kwargs.setdefault("source", model_name)
    return cached_model(_zoo_checkpoint_dir(model_path), device=device, **kwargs)


# -- the networks kept loaded in this process ----------------------------------------------------

_MODELS: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()  # key -> GroundingModel
_MODELS_LOCK = threading.Lock()
_STATS = {"hits": 0, "misses": 0}


def _cache_key(folder: Path, device, mixed_precision: str) -> tuple:
    """A checkpoint's identity: its folder, and its files' sizes and times (a checkpoint written
    again in the same folder is loaded again), the device and the precision."""
    stamp = tuple((name, p.stat().st_size, p.stat().st_mtime_ns)
                  for name in (CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME) if (p := folder / name).exists())
    return str(folder.resolve()), stamp, str(resolve_device(device)), mixed_precision


def cached_model(checkpoint, device=None, mixed_precision: str = "auto", **options):
    """The ``GroundingModel`` of a checkpoint folder (or a training run's folder), its network
    loaded once per process and kept for the next call (the ``MODEL_CACHE_SIZE`` most
    recently used). Each call returns its own ``GroundingModel`` on the shared network, with
    ``options`` (``prompt_field``, ``prompt``, ``confidence_thresh``, ``label``, ``source``)."""
    from ..inference.model import GroundingModel

    repo = hub_checkpoint(checkpoint)  # a Hub repository: recorded by its name, not its place in the cache
    folder = resolve_checkpoint_dir(checkpoint if repo is not None else Path(checkpoint).expanduser())
    key = _cache_key(folder, device, mixed_precision)
    with _MODELS_LOCK:  # one load at a time: two runs asking for one checkpoint load it once
        model = _MODELS.get(key)
        if model is None:
            _STATS["misses"] += 1
            model = GroundingModel.from_checkpoint(folder, device=device, mixed_precision=mixed_precision)
            _MODELS[key] = model
            while len(_MODELS) > MODEL_CACHE_SIZE:
                _MODELS.popitem(last=False)
        else:
            _STATS["hits"] += 1
            _MODELS.move_to_end(key)
    options.setdefault("source", str(repo) if repo is not None else str(folder))
    return model.with_options(**options)


def model_cache_info() -> dict:
    """``hits`` and ``misses`` of :func:`cached_model` (a miss loads the encoders and the
    checkpoint), and the checkpoints kept (``models``, least recently used first)."""
    with _MODELS_LOCK:
        return {**_STATS, "models": [key[0] for key in _MODELS], "max_size": MODEL_CACHE_SIZE}


def release_models() -> int:
    """Forget every kept network (their memory is freed once no run uses them); returns how many."""
    import torch

    with _MODELS_LOCK:
        count = len(_MODELS)
        _MODELS.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return count


def model_error(model: str) -> Optional[str]:
    """Why ``model`` names neither a checkpoint folder nor a zoo model (one sentence), or None."""
    import fiftyone.zoo as foz

    model = (model or "").strip()
    if not model:
        return NO_DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.exists():
        try:
            resolve_checkpoint_dir(path)
        except CheckpointError as e:
            return str(e)
        return None
    try:
        zoo_model = foz.get_zoo_model(model)
    except ValueError:
        if hub_checkpoint(model) is not None:
            return None  # a Hugging Face Hub repository: fetching it is no form check, loading it says what is wrong
        where = "" if path.is_absolute() else " by its absolute path (a relative one is read from the folder the process runs in)"
        return (f"{model!r} is neither a checkpoint folder nor a registered zoo model: give the folder "
                f"that training wrote (e.g. <run>/best){where}, or register this repository as a zoo source.")
    if zoo_model.base_name not in MODELS:
        return f"{model!r} is a zoo model but not a grounding one: choose one of {sorted(MODELS)}."
    return None


def load_grounding_model(model: str, device=None, **options):
    """A ``GroundingModel`` from a checkpoint folder, a training run's folder or a zoo model name,
    its network kept loaded for the next call (:func:`cached_model`); ``options`` as there."""
    import fiftyone.zoo as foz

    error = model_error(model)
    if error:
        raise InputError(error)
    model = model.strip()
    if Path(model).expanduser().exists() or not _is_zoo_model(model):  # a folder, or a Hub repository
        return cached_model(model, device=device, **options)
    return foz.load_zoo_model(model, device=device, **options)


def _is_zoo_model(name: str) -> bool:
    import fiftyone.zoo as foz

    try:
        foz.get_zoo_model(name)
    except ValueError:
        return False
    return True


def register_local_source(source_dir: Optional[str] = None, overwrite: bool = False) -> str:
    """Register a local clone of this repository as a model-zoo source (no network needed).

    Copies what ``foz.register_zoo_model_source`` copies from GitHub (the manifest, the root
    ``__init__.py`` and the package) into ``fo.config.model_zoo_dir``, records it under a
    ``file://`` URL and returns that URL. ``source_dir`` defaults to the clone this package
    was imported from.
    """
    import fiftyone as fo
    import fiftyone.zoo as foz

    src = Path(source_dir).expanduser().resolve() if source_dir else Path(__file__).resolve().parents[2]
    manifest_path = src / MANIFEST_NAME
    if not manifest_path.is_file():
        raise InputError(
            f"No {MANIFEST_NAME} in {src}: pass the folder of a fiftyone-grounding clone as source_dir")
    url = src.as_uri()
    if url in foz.list_zoo_model_sources() and not overwrite:
        return url
    manifest = json.loads(manifest_path.read_text())
    validate_manifest(manifest)
    dst = Path(fo.config.model_zoo_dir).joinpath(*manifest["name"].split("/"))
    if dst.exists() and not overwrite:
        raise InputError(f"A model source is already registered at {dst}: pass overwrite=True to replace it")

    def write(tmp: Path) -> None:
        for name in SOURCE_FILES:
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src / name, tmp / name)
        (tmp / MANIFEST_NAME).write_text(json.dumps({**manifest, "url": url}, indent=4))

    atomic_write_dir(dst, write)
    foz.register_zoo_model_source(url)  # already on disk: this only refreshes FiftyOne's view
    return url
