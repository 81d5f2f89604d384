"""An index directory's files: its SQLite schema, connections, the writer-lock file and
folders built aside. The store (fundus_sdk.store) and its readers (fundus_sdk.reader) use these."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import fsync_dir
from .errors import CaseIndexError
from .records import now

FORMAT = "1"
DB_NAME = "cases.sqlite"
LOCK_NAME = "writer.lock"
DIR_MODE = 0o700
CASE_SELECT = "SELECT key, path, sha256, grade, meta, added FROM cases"
LOG_TABLE = "vector_log"
SCHEMA = """
CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT,
    sha256 TEXT UNIQUE,
    grade INTEGER,
    meta TEXT NOT NULL DEFAULT '{}',
    added TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_grade ON cases(grade);
CREATE INDEX IF NOT EXISTS cases_path ON cases(path);
"""
# Added in place to older indexes when a writer opens them.
UPGRADES = f"""
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key INTEGER NOT NULL, at TEXT NOT NULL, field TEXT NOT NULL, old TEXT, new TEXT
);
CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
    id INTEGER PRIMARY KEY AUTOINCREMENT, generation INTEGER NOT NULL, key INTEGER NOT NULL, added INTEGER NOT NULL
);
"""

def alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def staging_dir(path: Path, doing: str) -> Path:
    """`.NAME.DOING-PID` beside `path`, where it is made before being renamed into place; what
    killed processes left there under that pattern is removed first."""
    for old in path.parent.glob(f".{path.name}.{doing}-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and (int(pid) == os.getpid() or not alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    return path.with_name(f".{path.name}.{doing}-{os.getpid()}")


def build_aside(path: Path, doing: str, build: Callable[[Path], Any]) -> Any:
    """`build(staging)` in a staging folder renamed to `path` when it succeeds: a kill or an error
    leaves nothing half-made at `path` (which must not exist or be an empty folder)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CaseIndexError(f"{path}: already exists and is not an empty directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(path, doing)
    try:
        result = build(staging)
        if path.is_dir():
            path.rmdir()  # empty, checked above
        staging.rename(path)
    except BaseException:  # a full disk, an interrupt: nothing half-made is left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    return result


def connect(db: Path, read_only: bool) -> sqlite3.Connection:
    """A connection to an index's database, checked readable.

    A process killed mid-commit leaves a hot journal, which a read-only connection cannot roll
    back ("attempt to write a readonly database"). Then one read-write connection reads the
    database, which makes SQLite roll the unfinished transaction back, and the read-only open
    is tried again. Without write access to the directory the error stands.
    """

    def attempt() -> sqlite3.Connection:
        uri = f"{db.resolve().as_uri()}?mode=ro" if read_only else str(db)
        conn = sqlite3.connect(uri, uri=read_only, isolation_level=None, check_same_thread=False)
        conn.execute("SELECT 1 FROM info LIMIT 1")
        return conn

    try:
        return attempt()
    except sqlite3.OperationalError:
        journal = db.with_name(db.name + "-journal")
        if read_only and journal.exists() and not os.access(db.parent, os.W_OK):
            raise CaseIndexError(
                f"{db.parent}: a write was interrupted there and SQLite must roll it back before the index can be read; "
                "open it once as a user who may write to that folder (e.g. `fundus-sdk index check` as its owner)"
            ) from None
        if not (read_only and journal.exists()):
            raise
        recover = sqlite3.connect(db, isolation_level=None)
        try:
            recover.execute("SELECT COUNT(*) FROM info").fetchone()
        finally:
            recover.close()
        return attempt()


def claim(lock) -> None:
    """Say in the writer-lock file who holds it now (a waiting writer names the holder)."""
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {now()}")
    lock.flush()



def dumps(value: Any) -> str | None:
    """A value as the `changes` table stores it: JSON, None for absent."""
    return None if value is None else json.dumps(value, default=str)
