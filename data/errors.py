"""Every domain exception shortlist raises, in one place.

Each message names the argument or column at fault and says how to fix it. The classes also derive
from the matching built-in exception (``ValueError``, ``KeyError``, ``FileNotFoundError``) so callers
that already catch those keep working.
"""

from __future__ import annotations


class ShortlistError(Exception):
    """Base class of every error raised on purpose by shortlist."""


class ConfigError(ShortlistError, ValueError):
    """A config field is unknown, has the wrong type, or is out of range."""


class DataValidationError(ShortlistError, ValueError):
    """Input data is malformed: a missing column, null or non-numeric ids, bad timestamps, no rows."""


class DatasetNotFoundError(ShortlistError, FileNotFoundError):
    """A dataset is neither on disk nor downloadable; the message says where to put the files."""


class ChecksumMismatchError(ShortlistError, ValueError):
    """A downloaded file does not match its pinned SHA-256."""


class ArtifactError(ShortlistError, ValueError):
    """A saved model, index or artifact folder is missing, corrupted, or does not match its manifest."""


class NotFittedError(ShortlistError, RuntimeError):
    """A model was used before ``fit`` (or ``load``)."""


class UnknownIdError(ShortlistError, KeyError):
    """An external user or item id is not in the vocabulary and no fallback applies."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(ShortlistError, RuntimeError):
    """A scoring backend cannot run here (missing extra such as ``[onnx]``, no CUDA device, unsupported CPU)."""


class BudgetExceededError(ShortlistError, TimeoutError):
    """A stage ran past its share of the latency budget (the pipeline degrades to the retrieval order)."""


class OverloadedError(ShortlistError, RuntimeError):
    """A queue is full; the caller should shed the request (HTTP 429/503) instead of waiting."""
