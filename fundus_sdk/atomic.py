"""Writing a file so that no reader ever sees half of it: aside, flushed, then renamed."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

FILE_MODE = 0o600  # index files and outputs name patients' photos: readable by their owner only


def fsync_dir(path: Path) -> None:
    """Make a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def write_atomically(path: str | Path, *, durable: bool = True, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, it replaces `path`.

    The temporary name carries the process id, so two writers never touch each other's file.
    On any failure (a full disk, Ctrl-C) the temporary file is removed and `path` is unchanged;
    an OSError that names no file is raised again naming `path`.
    With `durable`, the file and the directory entry are fsynced before returning; `mode`
    sets the file's permissions (e.g. 0o600) before it takes the final name.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc  # say which file could not be written
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


@contextmanager
def write_output(path: str | Path, *, text: bool = True, mode: int = FILE_MODE) -> Iterator[IO]:
    """An output file open for writing, as users expect of `-o PATH`.

    "-" is standard output. A symbolic link is followed and the link kept: its target is what
    gets written. A device or FIFO is written through, never replaced. A regular file (new or
    existing) is written aside and renamed into place with permissions `mode` (owner only).
    """
    open_args = {"mode": "w", "newline": "", "encoding": "utf-8"} if text else {"mode": "wb"}
    if str(path) == "-":
        stream = sys.stdout if text else sys.stdout.buffer
        yield stream
        stream.flush()
        return
    target = Path(path)
    if target.is_symlink():
        target = target.resolve()
    if target.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a file to write")
    if target.exists() and not target.is_file():
        with open(target, **open_args) as f:
            yield f
        return
    with write_atomically(target, durable=False, mode=mode) as tmp, open(tmp, **open_args) as f:
        yield f
