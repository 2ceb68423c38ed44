"""Checkpoints: a folder with ``config.json`` + ``model.safetensors`` (trainable weights only),
and ``calibration.json`` (the confidence's calibration) for models with a quality head or box
queries.

The frozen encoders are named by id/path in the config, not copied. Nothing here
unpickles: weights are safetensors, everything else JSON; ``convert_checkpoint`` reads an
old ``.pt`` state dict with torch's weights-only loader, which refuses code. Folders are written
atomically (written beside, then renamed), so a kill during a save leaves the previous
checkpoint loadable.

Wherever a checkpoint folder is asked for, a Hugging Face Hub repository holding the same files
will do: ``org/name``, or ``org/name@revision`` (also ``revision=``), fetched into the Hugging
Face cache by ``hub_repo.download_snapshot`` (safetensors and JSON only). A local path that
exists always wins over a repository of the same name.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .calibration import CALIBRATION_NAME, Calibration
from .config import GrounderConfig
from .hub_repo import CARD_NAME, HubRepo, download_snapshot, parse_hub_repo, repo_files
from ..errors import CheckpointError, InputError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
# What a checkpoint's Hub repository holds, and all that is fetched from one: the checkpoint's
# files (calibration.json only for models with a quality head or box queries) and its model card.
HUB_FILES = (CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME, CARD_NAME)

PathLike = Union[str, os.PathLike]


def atomic_write_dir(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder with ``write(tmp)`` then swap it in place of ``path`` by renames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


BEST_DIR = "best"  # the checkpoint a training run keeps: <run folder>/best


def hub_checkpoint(path: PathLike, revision: Optional[str] = None) -> Optional[HubRepo]:
    """The Hub repository that ``path`` names, or None where it is a local path.

    Only a string names a repository (a ``pathlib.Path`` is local: the folders that code builds,
    such as a fresh run's ``out/last``, never send a request to the Hub), and only where no path
    of that name exists here (nor the copy a kill mid-swap left beside it): then ``org/name`` or
    ``org/name@revision`` is a repository. ``revision`` (a branch, tag or commit) applies to a
    repository only, and must agree with a revision after ``@``.
    """
    text = os.fspath(path)
    local = Path(text).expanduser()
    is_local = (not isinstance(path, str) or not text.strip() or local.exists()
                or local.with_name(f".{local.name}.old").exists())
    repo = None if is_local else parse_hub_repo(text)
    if revision is None or revision == "":
        return repo
    if repo is None:
        raise InputError(f"revision={revision!r} applies to a Hugging Face Hub repository (org/name), and {text} "
                         "is a local path: leave the revision out.")
    if repo.revision not in (None, revision):
        raise InputError(f"{text} names revision {repo.revision!r} and revision= names {revision!r}: give one.")
    return HubRepo(repo.repo_id, revision)


def _hub_checkpoint_dir(repo: HubRepo) -> Path:
    """The cached snapshot of ``repo`` as a checkpoint folder; a repository whose weights are a
    pickle only is refused (its pickle is never fetched)."""
    folder = download_snapshot(repo, HUB_FILES)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if not missing:
        return folder
    pickles = sorted(name for name in repo_files(repo, folder) if name.lower().endswith(PICKLE_SUFFIXES))
    if WEIGHTS_NAME in missing and pickles:
        raise CheckpointError(
            f"The Hugging Face Hub repository {repo.shown} holds its weights as a pickle only ({pickles[0]}), "
            f"which can run code when loaded, so it is not fetched: fiftyone-grounding reads {WEIGHTS_NAME}; "
            f"convert it (`fiftyone-grounding convert {pickles[0]} OUT_DIR --preset NAME`, which reads tensors "
            f"only) and push OUT_DIR (`fiftyone-grounding push-to-hub OUT_DIR {repo.repo_id}`).")
    raise CheckpointError(
        f"The Hugging Face Hub repository {repo.shown} is not a fiftyone-grounding checkpoint: it has no "
        f"{' and no '.join(missing)} (in the local cache, if the Hub was off); push one with "
        f"`fiftyone-grounding push-to-hub RUN_DIR {repo.repo_id}`.")


def resolve_checkpoint_dir(path: PathLike, revision: Optional[str] = None) -> Path:
    """The checkpoint folder at ``path`` (or the one a kill mid-swap left beside it); a training
    run's folder (``out_dir``, holding ``best/`` and ``last/``) means its ``best/``; a Hugging Face
    Hub repository (``org/name``, ``org/name@revision``, ``revision=``; see :func:`hub_checkpoint`)
    means its snapshot in the Hugging Face cache, fetched first where it is not there."""
    repo = hub_checkpoint(path, revision)
    if repo is not None:
        return _hub_checkpoint_dir(repo)
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_NAME).exists() and (path / BEST_DIR).is_dir():
        path = path / BEST_DIR
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{path} is a pickle file, which can run code when loaded; fiftyone-grounding only loads "
                f"safetensors + JSON checkpoints. Convert it once with "
                f"`fiftyone-grounding convert {path} OUT_DIR --preset NAME`."
            )
        if path.name in (CONFIG_NAME, WEIGHTS_NAME):
            path = path.parent
    if not (path / CONFIG_NAME).exists():
        old = path.with_name(f".{path.name}.old")
        if (old / CONFIG_NAME).exists():
            return old
        raise CheckpointError(f"No checkpoint at {path}: expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not (path / WEIGHTS_NAME).exists():
        raise CheckpointError(f"Incomplete checkpoint at {path}: {WEIGHTS_NAME} is missing")
    return path


def save_checkpoint(model, path: PathLike, extra: Optional[dict] = None,
                    write_more: Optional[Callable[[Path], None]] = None) -> Path:
    """Save a ``Grounder``'s config and trainable weights (plus optional JSON metadata, and
    whatever ``write_more(folder)`` adds, e.g. the optimizer state of a resumable run)."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}

    def write(tmp: Path) -> None:
        model.config.to_json(tmp / CONFIG_NAME)
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if model.has_confidence:
            model.calibration.save(tmp)
        if extra is not None:
            (tmp / "info.json").write_text(json.dumps(extra, indent=2))
        if write_more is not None:
            write_more(tmp)

    return atomic_write_dir(path, write)


def load_config(path: PathLike, revision: Optional[str] = None) -> GrounderConfig:
    return GrounderConfig.from_json(resolve_checkpoint_dir(path, revision=revision) / CONFIG_NAME)


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu", weights: bool = True,
                    revision: Optional[str] = None):
    """Rebuild a ``Grounder`` from a checkpoint folder, a training run's folder or a Hugging Face
    Hub repository (``org/name``, at ``revision``) (encoders via ``from_pretrained``)."""
    from .build import build_model

    folder = resolve_checkpoint_dir(path, revision=revision)
    config = GrounderConfig.from_json(folder / CONFIG_NAME)
    model = build_model(config=config, weights=weights)
    load_trainable_weights(model, folder / WEIGHTS_NAME)
    model.calibration = Calibration.load(folder)
    return model.to(device).eval()


def load_trainable_weights(model, weights_file: PathLike) -> None:
    try:
        state = load_file(str(weights_file))
    except SafetensorError as e:  # e.g. a pickle renamed to .safetensors, or a cut-off download
        raise CheckpointError(f"{weights_file} is not a valid safetensors file ({e}); write it again with "
                              f"save_checkpoint or `fiftyone-grounding convert`") from None
    expected = set(model.trainable_state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file} does not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=False)


def convert_checkpoint(src: PathLike, out_dir: PathLike, preset: str, **overrides) -> Path:
    """Convert a PyTorch state dict file (``.pt``, ``.pth``, ``.bin``) into a checkpoint folder.

    The file is read with ``torch.load(weights_only=True)``, which accepts tensors and plain
    containers only and never runs code from the file. The trainable weights of ``preset``'s
    model (plus ``overrides``) are kept; frozen encoder weights in the file are not copied,
    the checkpoint names its encoders by id. Returns ``out_dir``.
    """
    from .build import build_model

    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"No file {src}") from None
    except pickle.UnpicklingError:  # it names classes or functions: loading it would run code
        raise CheckpointError(
            f"{src} holds more than tensors and plain containers (torch.load(weights_only=True) refused it); "
            f"loading it would run code from the file, so it is not converted. Where it was made, save the "
            f"weights alone with torch.save(model.state_dict(), path) and convert that.") from None
    except Exception as e:  # a damaged or foreign file: zip, EOF, ... errors
        raise CheckpointError(f"{src} cannot be read as a PyTorch file ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict", "model_state_dict"):  # common wrappers of a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{src} does not hold a state dict (a mapping of names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    model = build_model(preset, weights=False, **overrides)
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(("image_encoder.", "text_encoder.")))
    wrong_shape = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{src} does not match preset {preset!r}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {wrong_shape[:5]}; pass the preset (and overrides) it was trained with")
    model.load_state_dict({k: state[k] for k in expected}, strict=False)
    return save_checkpoint(model, out_dir)
