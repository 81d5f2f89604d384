"""The exceptions fundus-sdk raises. Catch `FundusError` to catch them all."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from enum import IntEnum
from typing import Union


class FundusError(Exception):
    """Base class of every error fundus-sdk raises on purpose."""


class ImageError(FundusError):
    """An input could not be turned into a fundus image; names the file and the reason."""

    def __init__(self, source: object, reason: str) -> None:
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


OnError = Union[str, Callable[[ImageError], None]]


def error_policy(on_error: OnError, stacklevel: int = 3) -> Callable[[ImageError], None]:
    """What to do with an input that fails, as one function: the one reading of `on_error`.

    "raise" raises the ImageError; "skip" warns and goes on; a callable receives each error.
    Anything else is a ValueError at once, before any work.
    """
    if on_error == "raise":

        def policy(err: ImageError) -> None:
            raise err

    elif on_error == "skip":

        def policy(err: ImageError) -> None:
            warnings.warn(f"skipped {err}", stacklevel=stacklevel)

    elif callable(on_error):
        policy = on_error
    else:
        raise ValueError(f"on_error must be 'raise', 'skip' or a callable, got {on_error!r}")
    return policy


class ModelError(FundusError):
    """A model file is missing, unreadable or lacks the metadata the runtime needs."""


class ModelMismatchError(FundusError):
    """Vectors or a model do not match the model an index was built with."""


class CaseIndexError(FundusError):
    """An index directory is missing, corrupt or used in a way it does not allow."""


class ProviderError(FundusError):
    """An ONNX Runtime execution provider was asked for but cannot run here."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


class Exit(IntEnum):
    """The exit status of every command line of the project (fundus-sdk, python -m training,
    python -m export): one convention, documented in the README."""

    OK = 0  # everything succeeded
    PARTIAL = 1  # some inputs failed (each named on stderr); the rest was processed
    USAGE = 2  # a bad option or argument (click and argparse use 2 as well)
    FATAL = 3  # nothing could be done: missing or unusable index, model, checkpoint or label file, ...
    INTERRUPTED = 130  # Ctrl-C; whatever was committed is kept
