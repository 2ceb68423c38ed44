"""A Hugging Face cache on disk as ``huggingface_hub`` leaves it after a download, for tests that
load Hub repositories without a network: ``models--ORG--NAME/blobs/<hash>`` holds each file's
bytes, ``snapshots/<commit>/<file>`` is a relative link to its blob, ``refs/<branch or tag>``
holds the commit's hash."""

import hashlib
from pathlib import Path

from huggingface_hub import constants


def use_cache(monkeypatch, cache: Path) -> Path:
    """Point ``huggingface_hub`` at ``cache`` with the Hub off, for this test.

    It reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` into ``huggingface_hub.constants`` when it
    is imported, and its downloads read those constants at each call: both the constants and the
    environment (for processes a test starts, and for ``hub.hub_offline``) are set.
    """
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_repo(cache: Path, repo_id: str, files: dict, revision: str = "main") -> Path:
    """Add a commit of the model repository ``repo_id`` holding ``files`` (name -> bytes) to the
    cache, recorded as ``revision``; returns its snapshot folder (named by the commit's hash)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    digest = hashlib.sha1(revision.encode())
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + data)
    commit = digest.hexdigest()  # 40 hex digits, as a git commit's
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()  # an LFS file's blob is named by its sha256
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def checkpoint_files(folder: Path) -> dict:
    """The files of a checkpoint folder that its Hub repository holds (name -> bytes)."""
    names = ("config.json", "model.safetensors", "calibration.json", "README.md")
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}
