"""Writing an index directory: vectors in usearch, records (and a copy of each vector) in SQLite.

A Store knows vectors and records, never images or models: it is made for a `VectorSpec`
(dimension, the fingerprint of the model whose vectors it holds, grading scale) and `Settings`.
It reads as its base class, fundus_sdk.reader.Reader, does.

Layout of an index directory:
- `cases.sqlite`: table `cases` (key, path, sha256, grade, meta JSON, added, vector), table
  `info` (format, model fingerprint and name, dimension, vector dtype, generation, settings),
  `changes` (every change of a stored value) and `vector_log` (vectors added and removed since
  the vector file was written). SQLite is the source of truth; every change is one transaction.
- `vectors-<generation>.usearch`: the vectors as of that generation.

Why this survives crashes: a commit logs its vectors in SQLite, and at most every `log_limit`
changes writes the whole vector file aside (`.tmp`, fsync, rename) under the committing
generation *before* the SQLite transaction commits, deleting the old file only after. Whenever
the process dies, SQLite names a vector file that is complete on disk; if that file is missing
or disagrees with SQLite, it is rebuilt from the vectors SQLite holds. Writes are serialised by
a thread lock within a process and by a file lock between processes.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import vectors as vec
from .atomic import FILE_MODE
from .disk import DB_NAME, DIR_MODE, FORMAT, LOCK_NAME, LOG_TABLE, SCHEMA, UPGRADES, build_aside, claim, dumps
from .errors import CaseIndexError
from .labels import ICDR, Scale
from .reader import Reader, Snapshot
from .records import Change, now
from .vectors import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorSpec:
    """What vectors a store holds: their dimension and the model that computes them."""

    dim: int
    fingerprint: str  # the whole model's (fundus_sdk.Model.fingerprint)
    name: str = "unknown"
    scale: Scale = ICDR
    weights_fingerprint: str | None = None  # what embedding files from before 0.4 record


class Store(Reader):
    """The vectors and records of one index directory, read and written. Create with
    `Store.create`, open with `Store.open`; read-only users open a Reader."""

    read_only = False

    def __init__(self, path: Path, defaults: Settings | None = None) -> None:
        self._write = threading.RLock()  # one thread of this process writes at a time
        self._writing: int | None = None  # the thread that holds the writer lock
        super().__init__(path, defaults)
        self._tidy()

    def _prepare(self) -> None:
        """The writer's connection, and the tables older indexes lack."""
        self._writer_conn = connect_writer(self._db)
        self._opened.append(self._writer_conn)
        self._writer_conn.executescript(UPGRADES)

    # -- opening, creating, closing ------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, spec: VectorSpec, dtype: str = "f16", root: str | Path | None = None,
               settings: Settings | None = None) -> "Store":  # fmt: skip
        """A new, empty store in directory `path` (which must not exist or must be empty), made
        aside and renamed into place. Paths of photos are stored absolute, or relative to `root`."""
        path = Path(path)
        info = {
            "format": FORMAT, "model_fingerprint": spec.fingerprint, "model_name": spec.name, "dim": str(spec.dim),
            "dtype": dtype, "generation": "0", "vectors_generation": "0", "scale": spec.scale.spec, "created": now(),
            **(settings or Settings()).to_info(),
        }  # fmt: skip
        if spec.weights_fingerprint is not None:
            info["model_weights"] = spec.weights_fingerprint
        if root is not None:
            info["root"] = str(Path(root).resolve())

        def build(staging: Path) -> None:
            staging.mkdir(mode=DIR_MODE)
            conn = sqlite3.connect(staging / DB_NAME, isolation_level=None)
            os.chmod(staging / DB_NAME, FILE_MODE)
            try:
                conn.executescript(SCHEMA + UPGRADES)
                with conn:
                    conn.execute("BEGIN")
                    conn.executemany("INSERT INTO info VALUES (?, ?)", info.items())
            finally:
                conn.close()

        build_aside(path, "creating", build)
        log.info("created index %s for %s", path, spec.name)
        return cls.open(path)

    def _conn(self) -> sqlite3.Connection:
        """The writer's connection for the thread that holds the writer lock (it reads what it
        is committing), else this thread's own."""
        if self._writing == threading.get_ident():
            return self._writer_conn
        return super()._conn()

    def _load(self) -> Snapshot:
        snap = super()._load()
        if snap.rebuilt and self._writing is not None:  # only the writer-lock holder writes files
            snap = self._write_vector_file(snap, snap.generation)
        return snap

    # -- writing -----------------------------------------------------------------------------------

    def _tidy(self) -> None:
        """Remove a killed writer's leftovers now if no writer is at work (else the next write will)."""
        with os.fdopen(os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE), "r+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            claim(lock)
            self._writing = threading.get_ident()
            try:
                self.refresh()
                if self._snap.rebuilt:  # the file was missing or damaged: store the vectors rebuilt from SQLite
                    self._snap = self._write_vector_file(self._snap, self.generation)
                self._remove_leftovers()
            finally:
                self._writing = None

    @contextmanager
    def writer(self) -> Iterator[sqlite3.Connection]:
        """Hold the index's writer lock (one writing thread and process at a time) on the latest
        snapshot; yields the writer's connection."""
        with self._write:
            if self._writing == threading.get_ident():  # re-entered by this thread
                yield self._writer_conn
                return
            lock = os.fdopen(os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE), "r+")
            try:
                deadline = time.monotonic() + self.settings.lock_timeout
                while True:
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            lock.seek(0)
                            holder = lock.read().strip() or "another process"
                            raise CaseIndexError(f"{self.path}: another writer holds the index ({holder}); waited "
                                                 f"{self.settings.lock_timeout:.0f} s") from None  # fmt: skip
                        time.sleep(0.05)
                claim(lock)
                self._writing = threading.get_ident()
                self.refresh()
                yield self._writer_conn
            finally:
                self._writing = None
                lock.close()  # releases the lock

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction, committed when the block ends; on any error rolled back, a
        SQLite error (a full disk) raised as the index's, which stays as it was."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:  # SQLite may have rolled back itself (a full disk): keep the cause
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise CaseIndexError(f"{self.path}: the change could not be committed ({exc}); the index is as it was") from exc
            raise

    def _write_vector_file(self, snap: Snapshot, generation: int) -> Snapshot:
        """Write `snap`'s vectors as `generation`'s vector file and make it the base: its checksum
        recorded and the vector log emptied, in the caller's transaction or its own."""
        digest = vec.save(snap.vectors, self._vector_file(generation))
        conn = self._writer_conn
        own = not conn.in_transaction
        if own:
            conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)",
                             [("vectors_generation", str(generation)), ("vectors_sha256", digest)])  # fmt: skip
            conn.execute(f"DELETE FROM {LOG_TABLE}")
            if own:
                conn.execute("COMMIT")
        except BaseException:
            if own and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return replace(snap, info=snap.info | {"vectors_generation": str(generation), "vectors_sha256": digest}, rebuilt=False)

    def commit(self, change: Callable[[sqlite3.Connection], tuple[Any, Sequence[int], np.ndarray | None, Sequence[int]]]) -> Any:
        """Run `change(connection)` as one durable step, a SQLite transaction. It returns (result,
        keys added, their vectors, keys removed); those are logged in SQLite and applied to the
        vectors. Once more than `log_limit` changes are logged, the vector file is rewritten in the
        same step, so a commit costs O(change) and rewriting is spread over `log_limit` changes."""
        with self.writer() as conn:
            snap = self._snap
            new = snap.generation + 1
            try:
                with self._transaction(conn):
                    conn.execute("INSERT OR IGNORE INTO info VALUES ('vectors_generation', ?)", (str(new - 1),))
                    result, added, added_vecs, removed = change(conn)
                    conn.executemany(f"INSERT INTO {LOG_TABLE} (generation, key, added) VALUES (?, ?, ?)",
                                     [(new, int(k), 1) for k in added] + [(new, int(k), 0) for k in removed])  # fmt: skip
                    vectors = vec.updated(snap.vectors, np.array(added, np.uint64), added_vecs if len(added) else
                                          np.empty((0, self.dim), np.float32), np.array(removed, np.uint64))  # fmt: skip
                    conn.execute("UPDATE info SET value = ? WHERE name = 'generation'", (str(new),))
                    info = snap.info | {"generation": str(new)}
                    info.setdefault("vectors_generation", str(new - 1))
                    snap = Snapshot(new, info, vectors)
                    if conn.execute(f"SELECT COUNT(*) FROM {LOG_TABLE}").fetchone()[0] > self.settings.log_limit:
                        if vec.holds_removed_slots(vectors):  # which usearch 2.25 saves but cannot read back:
                            snap = replace(snap, vectors=self._vectors_from_sqlite(info))  # a fresh index has none
                        snap = self._write_vector_file(snap, new)
            except BaseException:
                self._vector_file(new).unlink(missing_ok=True)
                self._snap = self._load()  # the vectors in memory may hold the change: read them again
                raise
            self._snap = snap
            self._remove_leftovers()
            log.debug("%s: committed generation %d (%d cases)", self.path, new, len(snap.vectors))
            return result

    def insert(self, rows: Sequence[tuple], keep: Sequence[tuple[int, str]] | None = None) -> list[tuple[int, int]]:
        """Insert (position, path, sha256, grade, meta json, vector) rows in one commit; returns
        (position, key) of each, a photo already held by its key. `keep` gives rows their (key,
        added) from another index (a rebuild keeps both)."""

        def change(cur: sqlite3.Connection):
            out, new_keys, new_vecs = [], [], []
            at = now()
            for i, (pos, path, sha, grade, meta_json, vector) in enumerate(rows):
                existing = cur.execute("SELECT key FROM cases WHERE sha256 = ?", (sha,)).fetchone() if sha else None
                if existing:
                    out.append((pos, existing[0]))
                    continue
                key, when = keep[i] if keep is not None else (None, at)
                key = cur.execute(
                    "INSERT INTO cases (key, path, sha256, grade, meta, added, vector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, path, sha, grade, meta_json, when, np.asarray(vector, dtype=np.float32).tobytes()),
                ).lastrowid
                out.append((pos, key))
                new_keys.append(key)
                new_vecs.append(vector)
            return out, new_keys, np.stack(new_vecs).astype(np.float32) if new_vecs else None, []

        return self.commit(change)

    def record(self, changes: Sequence[Change]) -> None:
        """Add changes to the history as they were recorded elsewhere (a rebuild carries them over)."""
        with self.writer() as conn, conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO changes (key, at, field, old, new) VALUES (?, ?, ?, ?, ?)",
                             [(c.key, c.at, c.field, dumps(c.old), dumps(c.new)) for c in changes])  # fmt: skip

    def update(self, key: int, grade: int | None, extra: dict[str, Any], removed: Sequence[str]) -> None:
        """Set a case's grade (None: unchanged) and metadata fields, remove fields; each change recorded in `changes`."""
        at = now()
        with self.writer() as conn, self._transaction(conn):
            stored_grade, stored_meta = conn.execute("SELECT grade, meta FROM cases WHERE key = ?", (key,)).fetchone()
            meta = json.loads(stored_meta)
            changes = []
            if grade is not None and grade != stored_grade:
                changes.append(("grade", stored_grade, grade))
                stored_grade = grade
            for name in removed:
                if name in meta:
                    changes.append((name, meta.pop(name), None))
            for name, value in extra.items():
                if meta.get(name) != value:
                    changes.append((name, meta.get(name), value))
                    meta[name] = value
            conn.execute("UPDATE cases SET grade = ?, meta = ? WHERE key = ?", (stored_grade, json.dumps(meta, default=str), key))
            conn.executemany("INSERT INTO changes (key, at, field, old, new) VALUES (?, ?, ?, ?, ?)",
                             [(key, at, f, dumps(o), dumps(v)) for f, o, v in changes])  # fmt: skip

    def remove(self, keys: Sequence[int], purge: Callable[[str], bool] = lambda field: False) -> int:
        """Remove cases by key; returns how many were there. Each removal is recorded in the history
        (field "case": its sha256 and grade), and the removed cases' recorded changes of fields
        for which `purge(field)` holds are deleted from it."""
        at = now()

        def change(cur: sqlite3.Connection):
            gone = [(k, *row) for k in keys for row in cur.execute("SELECT sha256, grade FROM cases WHERE key = ?", (k,))]
            cur.executemany("DELETE FROM cases WHERE key = ?", [(k,) for k, _, _ in gone])
            for key, _, _ in gone:
                cur.executemany("DELETE FROM changes WHERE id = ?",
                                [(i,) for i, f in cur.execute("SELECT id, field FROM changes WHERE key = ?", (key,)) if purge(f)])  # fmt: skip
            cur.executemany("INSERT INTO changes (key, at, field, old, new) VALUES (?, ?, 'case', ?, NULL)",
                            [(key, at, json.dumps({"sha256": sha, "grade": grade})) for key, sha, grade in gone])  # fmt: skip
            return len(gone), [], None, [k for k, _, _ in gone]

        return self.commit(change)

    def set_info(self, name: str, value: str | None) -> None:
        """Set (None: delete, its bytes overwritten) an entry of the `info` table."""
        with self.writer() as conn:
            conn.execute("PRAGMA secure_delete = ON")
            try:
                with conn:
                    conn.execute("BEGIN IMMEDIATE")
                    if value is None:
                        conn.execute("DELETE FROM info WHERE name = ?", (name,))
                    else:
                        conn.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (name, value))
            finally:
                conn.execute("PRAGMA secure_delete = OFF")
            info = self._read_info(conn)
            self._snap = replace(self._snap, info=info)

    def repair(self) -> bool:
        """Rewrite the vector file from SQLite and remove leftovers of interrupted writers, when
        `check` finds anything to do; returns whether it did."""
        report = self.check()
        if report["ok"] and not report["leftover_files"]:
            return False
        with self.writer():
            rebuilt = replace(self._snap, vectors=self._vectors_from_sqlite(self._snap.info))
            self._snap = self._write_vector_file(rebuilt, rebuilt.generation)
            self._remove_leftovers()
        return True

    def _remove_leftovers(self) -> None:
        """Under the writer lock no other writer has a file in flight: what is left is a dead one's."""
        for p in self._vector_files()[1]:
            p.unlink(missing_ok=True)


def connect_writer(db: Path) -> sqlite3.Connection:
    """The connection a Store writes through (shared by its threads, under its thread lock)."""
    return sqlite3.connect(db, isolation_level=None, check_same_thread=False)
