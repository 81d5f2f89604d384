"""What every command shares: errors as one line and an exit status, progress bars, the photos
named on the command line, and the --model / --provider / --threads options."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any

import click

from ..dicom import Frame, expand_frames
from ..errors import Exit, FundusError, ImageError
from ..index import Index
from ..inputs import find_images
from ..model import Model, load_model


def fatal(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(Exit.FATAL)


def handle_errors(fn: Callable) -> Callable:
    """Expected errors become one line on stderr and an exit status, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (FundusError, FileNotFoundError, ValueError) as exc:
            fatal(str(exc))
        except KeyError as exc:  # a case that is not in the index
            fatal(str(exc.args[0]))
        except BrokenPipeError:  # the reader went away (`| head -1`): what it wanted was written; end quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(Exit.OK)
        except sqlite3.Error as exc:  # a damaged database file, or a full disk at commit
            fatal(f"the index database failed: {exc}")
        except OSError as exc:  # e.g. a full disk: the index and any output stay as they were
            fatal(f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(Exit.INTERRUPTED)

    return wrapper


@contextmanager
def progress(total: int, label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal and not --quiet; otherwise silent."""
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True) as bar:
        yield bar.update


def report_failure(err: ImageError) -> None:
    click.echo(f"skipped {err}", err=True)


def gather(paths: tuple[str, ...] | list[str], recursive: bool) -> tuple[list[Path | Frame], list[ImageError]]:
    """The image files of PATHS (a multi-frame DICOM file as its frames); paths that cannot be
    opened are named on stderr and left out, and finding nothing at all is fatal (one line)."""
    missing: list[ImageError] = []
    skipped: list[tuple[Path, str]] = []
    files = expand_frames(find_images(paths, recursive, on_missing=missing.append, on_skipped=lambda *s: skipped.append(s)))
    for path, reason in skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    if skipped:
        click.echo(f"note: {len(skipped)} entries of the folders given are not photos and were skipped (named above)", err=True)
    if not files:
        fatal("; ".join(str(e) for e in missing) if missing else f"no images found in {', '.join(map(str, paths))}")
    for err in missing:
        report_failure(err)
    return files, missing


@dataclass(frozen=True)
class Runtime:
    """The model a command uses and how it runs: --model, --provider, --threads."""

    path: str | None
    providers: tuple[str, ...]
    threads: int | None

    def load(self) -> Model:
        """The model (the bundled one unless --model), on the providers and threads asked for."""
        return load_model(self.path, list(self.providers) or None, self.threads)

    def open(self, directory: str, read_only: bool = False) -> Index:
        """An index, with this model when --model was given (else the index's own default)."""
        return Index.open(directory, read_only=read_only, model=self.path, providers=list(self.providers) or None,
                          threads=self.threads)  # fmt: skip


def model_option(command: Callable) -> Callable:
    """--model, --provider and --threads on a command, passed to it as `runtime` (a Runtime)."""

    @click.option("--model", "model_path", type=click.Path(dir_okay=False), help="ONNX model file (default: the bundled model).")
    @click.option("--provider", "providers", multiple=True, metavar="NAME",
                  help="ONNX Runtime execution provider: cpu, cuda or a full name (repeatable, in order of preference; "
                  "default: CUDA when this onnxruntime has it, else the CPU).")
    @click.option("--threads", type=click.IntRange(1, 1024), default=None,
                  help="ONNX Runtime threads (default: every core); give each of several processes its share.")
    @wraps(command)
    def with_runtime(*args: Any, model_path: str | None, providers: tuple[str, ...], threads: int | None, **kwargs: Any) -> Any:
        return command(*args, runtime=Runtime(model_path, providers, threads), **kwargs)

    return with_runtime


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
batch_option = click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
recursive_option = click.option("-r", "--recursive", is_flag=True, help="Look for images in sub-folders too.")
check_option = click.option(
    "--no-check", "no_check", is_flag=True,
    help="Skip the input gate (by default, pictures that are not colour fundus photographs are refused).",
)  # fmt: skip


def case_ref(text: str) -> int | str:
    """A case named on the command line: a key (digits), else a sha256 or a path."""
    return int(text) if text.isdigit() else text
