"""Hugging Face Hub repositories as checkpoint folders: ``org/name`` (``org/name@revision`` on the
command line) names a repository whose files are a checkpoint folder's, fetched into
``huggingface_hub``'s cache once and read from there.

Only the named files are fetched (``allow_patterns``): a ``pytorch_model.bin`` beside them is
never downloaded, let alone unpickled. Where the Hub cannot be used (``hub.hub_offline``:
``HF_HUB_OFFLINE`` is set, or the endpoint does not answer) only the local cache is read, so a
repository fetched before still loads and anything else fails at once with one sentence, not
after a minute of retries. Every failure is a ``CheckpointError`` that says what to do.

``checkpoint.resolve_checkpoint_dir`` is the one caller that decides whether a path is a Hub
repository; this module knows the Hub, not what a checkpoint holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import CheckpointError
from ..hub import hub_offline, offline_setting

CARD_NAME = "README.md"  # a repository's model card
HUB_URL = "https://huggingface.co"


@dataclass(frozen=True)
class HubRepo:
    """A Hub model repository and the revision to read (a branch, tag or commit; None: ``main``)."""

    repo_id: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        """``org/name`` or ``org/name@revision``: how the command line names it, and how a model
        loaded from it records where it came from."""
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    @property
    def shown(self) -> str:
        """The repository and its revision for a message."""
        return f"{self.repo_id} (revision {self.revision!r})" if self.revision else self.repo_id


def parse_hub_repo(text: str) -> Optional[HubRepo]:
    """``org/name`` or ``org/name@revision`` as a ``HubRepo``; None for anything that cannot be a
    Hub model id: a bare name, an absolute path or one that starts with ``~`` or ``.``, more than
    one ``/`` before the ``@``, characters a repo id cannot hold. Whether a local path by that
    name exists is the caller's question (a local one always wins)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(text, str):
        return None
    repo_id, at, revision = text.strip().partition("@")
    if repo_id.count("/") != 1 or (at and not revision.strip()):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubRepo(repo_id, revision.strip() or None)


def download_snapshot(repo: HubRepo, files: Sequence[str]) -> Path:
    """The folder of ``repo``'s snapshot in the Hugging Face cache, holding those of ``files``
    that the repository has (downloaded now where they are not cached yet).

    Offline (see the module's docstring) only the cache is read. Missing, private, gated,
    unknown revision, no connection: a ``CheckpointError`` of one sentence.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = hub_offline()
    try:
        return Path(snapshot_download(repo.repo_id, revision=repo.revision, allow_patterns=list(files),
                                      local_files_only=offline is not None))
    except GatedRepoError:
        raise CheckpointError(f"The Hugging Face Hub repository {repo.shown} is gated: accept its conditions on "
                              f"{HUB_URL}/{repo.repo_id} and log in with `hf auth login` (or set HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"Neither a local folder nor a Hugging Face Hub repository is named {repo.repo_id} (or "
                              "the repository is private): check the path or the name, or log in with `hf auth "
                              "login` (or set HF_TOKEN) if the repository is yours.") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"The Hugging Face Hub repository {repo.repo_id} has no revision {repo.revision!r}: "
                              f"name one of its branches, tags or commits ({HUB_URL}/{repo.repo_id}/tree/main), "
                              "or leave the revision out.") from None
    except LocalEntryNotFoundError as e:  # not cached, and the Hub is off or did not answer
        why = offline or _short(e.__cause__ or e)
        online = "unset HF_HUB_OFFLINE" if offline_setting() else "connect"
        at = f" --revision {repo.revision}" if repo.revision else ""
        raise CheckpointError(
            f"{repo.shown} is not in the local Hugging Face cache and the Hub cannot be used ({why}): {online} "
            f"to download it, or download it where the Hub is reachable (`hf download {repo.repo_id}{at}`) and copy "
            f"that cache into {cache_dir()}, or give a local checkpoint folder instead.") from None
    except (HfHubHTTPError, OSError) as e:  # the Hub is down, a disk is full, ...
        raise CheckpointError(f"Could not fetch {repo.shown} from the Hugging Face Hub ({_short(e)}): check "
                              "your connection and try again, or give a local checkpoint folder.") from None


def repo_files(repo: HubRepo, snapshot: Path) -> set[str]:
    """The names of ``repo``'s files known here without asking the Hub: those in its cached
    ``snapshot`` folder, and those that the cached listing of that commit names (which a
    download records)."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    names = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")}
    try:
        names |= {f.path for f in get_cached_repo_tree(repo.repo_id, revision=snapshot.name)}
    except CachedRepoTreeNotFoundError:  # laid out by hand, or by an older huggingface_hub
        pass
    return names


def cache_dir() -> str:
    """The Hugging Face cache folder that downloads go to (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return os.fspath(constants.HF_HUB_CACHE)


def _short(error: BaseException) -> str:
    """An error as one short line (``huggingface_hub``'s messages span several)."""
    text = " ".join(str(error).split()).replace(". ", "; ") or type(error).__name__
    text = text if len(text) <= 200 else text[:197] + "..."
    return text.rstrip(".")
