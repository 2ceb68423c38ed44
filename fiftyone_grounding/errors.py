"""The errors fiftyone-grounding raises on purpose: one base class, a subclass per kind of problem.

Every message says what went wrong and what to do about it, in one line. The command line
prints a ``GroundingError`` as ``error: <message>`` and exits with status 2; anything else
that escapes is a bug and keeps its traceback. Each subclass also derives from the builtin
exception that code written before it existed would catch (``ValueError``, ``RuntimeError``,
``FileNotFoundError``).
"""

from __future__ import annotations


class GroundingError(Exception):
    """Base class of every error fiftyone-grounding raises on purpose."""


class ConfigError(GroundingError, ValueError):
    """A model or training configuration (or a preset name) is invalid."""


class InputError(GroundingError, ValueError):
    """An argument, field, phrase or dataset does not fit what the call needs."""


class ImageError(GroundingError, ValueError):
    """An image file cannot be read (missing, corrupt, too large)."""


class CheckpointError(GroundingError, ValueError):
    """A checkpoint folder is missing, incomplete or of a refused kind."""


class SourceError(GroundingError, ValueError):
    """A dataset source (annotation files, a Hub dataset) does not have the expected form."""


class MissingImagesError(GroundingError, FileNotFoundError):
    """Images that an import needs are not on disk."""


class EncoderUnavailableError(GroundingError, RuntimeError):
    """An encoder or tokenizer could not be loaded."""


class DownloadError(GroundingError, RuntimeError):
    """Something could not be downloaded (a zoo checkpoint, a Hub dataset, COCO images)."""


class TrainingError(GroundingError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss)."""


class HubUploadError(GroundingError, RuntimeError):
    """A checkpoint could not be pushed to the Hugging Face Hub (offline, no token, no rights)."""
