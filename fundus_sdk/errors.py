"""The exceptions fundus-sdk raises. Catch `FundusError` to catch them all."""

from __future__ import annotations

from pathlib import Path


class FundusError(Exception):
    """Base class of every error fundus-sdk raises on purpose."""


class ImageError(FundusError):
    """An input could not be turned into a fundus image; names the file and the reason."""

    def __init__(self, source: object, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class ModelError(FundusError):
    """A model file is missing, unreadable or lacks the metadata the runtime needs."""


class ModelMismatchError(FundusError):
    """Vectors or a model do not match the model an index was built with."""


class CaseIndexError(FundusError):
    """An index directory is missing, corrupt or used in a way it does not allow."""


class ProviderError(FundusError):
    """An ONNX Runtime execution provider was asked for but cannot run here."""


def describe(source: object) -> str:
    """A short name for an input in messages: the path for files, the type otherwise."""
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__}>"
