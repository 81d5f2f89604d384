"""A case index on disk: vectors in usearch, metadata (and a copy of each vector) in SQLite.

Layout of an index directory:
- `cases.sqlite`: table `cases` (key, path, sha256, grade, meta JSON, added, vector) and table
  `info` (format, model fingerprint and name, dimension, vector dtype, generation). SQLite is
  the source of truth; every change is one transaction.
- `vectors-<generation>.usearch`: the approximate-search index for that generation.

Why this survives crashes: a change writes the new usearch file aside (`.tmp`, fsync, rename)
under the next generation number *before* the SQLite transaction that bumps the generation
commits, and deletes the old file only after. Whenever the process dies, SQLite names a
generation whose vector file is complete on disk; if that file is missing or disagrees with
SQLite, it is rebuilt from the vectors SQLite holds.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import shutil
import socket
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np

from .atomic import FILE_MODE, fsync_dir, write_atomically, write_output
from .contract import unit_rows
from .errors import CaseIndexError, ImageError, ModelMismatchError, OnError, describe, error_policy
from .dicom import Frame, identifying, looks_like_dicom
from .dicom import frames as dicom_frames
from .filters import COLUMNS, Where, compile_filter
from .gate import NotFundusError, UngradableWarning, Verdict
from .inputs import ImageInput, identify
from .labels import ICDR, Scale
from .model import Model, Providers, as_list, load_model  # imports onnxruntime before usearch, see below

# onnxruntime must be loaded before usearch's extension: the other order crashed with usearch 2.26.
from usearch.index import Index as _USearch  # noqa: E402

FORMAT = "1"
DB_NAME = "cases.sqlite"
LOCK_NAME = "writer.lock"
log = logging.getLogger(__name__)
# The secret of the patient pseudonyms (HMAC of the PatientID) is kept out of the database, which
# is copied and exported, in its own owner-only file: the hospital's (FUNDUS_SDK_PSEUDONYM_KEY names
# it), else one the index makes beside its database. Indexes before 0.4 held it in `info`.
PSEUDONYM_KEY = "pseudonym_key"
PSEUDONYM_FILE = "pseudonym.key"
PSEUDONYM_ENV = "FUNDUS_SDK_PSEUDONYM_KEY"
# Fields the index derives itself, never taken from the caller's metadata: the case's key, photo
# path, identity and date added, the input gate's gradability score, and the keyed pseudonym of a
# DICOM PatientID (a label column of that name would let anyone pose as a patient's photos).
RESERVED = ("key", "path", "sha256", "added", "gradability", "patient_pseudonym")
ON_CONFLICT = ("keep", "update")

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
# Every change of a stored value, so that a grade can be traced (added in place to older indexes).
CHANGES = """
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key INTEGER NOT NULL,
    at TEXT NOT NULL,
    field TEXT NOT NULL,
    old TEXT,
    new TEXT
);
"""
# The vectors added and removed since the vector file was last written (generation > its own).
LOG_TABLE = "vector_log"
VECTOR_LOG = f"""
CREATE TABLE IF NOT EXISTS {LOG_TABLE} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    generation INTEGER NOT NULL,
    key INTEGER NOT NULL,
    added INTEGER NOT NULL
);
"""
CaseRef = Union[int, str, Path]  # a key, a sha256, or the path of the photo


DIR_MODE = 0o700


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _connect(db: Path, read_only: bool) -> sqlite3.Connection:
    """A connection to an index's database, checked readable.

    A process killed mid-commit leaves a hot journal, which a read-only connection cannot roll
    back ("attempt to write a readonly database"). Then one read-write connection reads the
    database, which makes SQLite roll the unfinished transaction back, and the read-only open
    is tried again. Without write access to the directory the error stands.
    """

    def attempt() -> sqlite3.Connection:
        if read_only:
            conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            conn.executescript(CHANGES + VECTOR_LOG)
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


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Case:
    """A case as the index holds it: key (a stable identifier, never reused), where the photo
    is, its identity (sha256 of its content), grade and the rest of its metadata."""

    key: int
    path: str | None
    sha256: str | None
    grade: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    added: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The case as plain JSON-ready values."""
        return asdict(self)


@dataclass
class Hit(Case):
    """One retrieved case: a Case and its cosine similarity to the query."""

    score: float = 0.0

    def __repr__(self) -> str:
        return f"Hit(key={self.key}, score={self.score:.3f}, grade={self.grade}, path={self.path!r})"

    def to_dict(self) -> dict[str, Any]:
        """The hit as plain JSON-ready values, key and score first."""
        return {"key": self.key, "score": self.score} | {k: v for k, v in asdict(self).items() if k not in ("key", "score")}


@dataclass(frozen=True)
class BatchHits(Sequence):
    """The hits of several queries, one list[Hit] per query in query order (`Index.search_batch`)."""

    hits: list[list[Hit]]

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i):  # type: ignore[override]
        return self.hits[i]

    def __repr__(self) -> str:
        return f"BatchHits({len(self.hits)} queries, {sum(map(len, self.hits))} hits)"

    def to_dict(self) -> list[list[dict[str, Any]]]:
        """The hits as plain JSON-ready values, a list per query."""
        return [[h.to_dict() for h in hits] for hits in self.hits]


@dataclass(frozen=True)
class Change:
    """One recorded change of a case's stored value (None: absent)."""

    key: int
    at: str
    field: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Conflict:
    """A photo added again with metadata other than the stored one."""

    key: int
    path: str | None
    field: str
    stored: Any
    given: Any

    def __str__(self) -> str:
        return f"{self.path or self.key}: stored {self.field} {self.stored!r}, given {self.given!r}"


def check_metadata(meta: dict[str, Any] | None, scale: Scale = ICDR) -> tuple[int | None, dict[str, Any]]:
    """(grade, the other fields) of one case's metadata; ValueError for what the index refuses
    (a grade off `scale`, the index's)."""
    extra = dict(meta or {})
    for name in extra:
        if not isinstance(name, str) or not name or '"' in name or any(ord(c) < 32 for c in name):
            raise ValueError(f"metadata field names must be non-empty text without quotes, got {name!r}")
        if name in RESERVED:
            raise ValueError(f"metadata field {name!r} is reserved: the index derives {', '.join(RESERVED)} itself")
    for name, value in extra.items():
        if not finite(value):
            raise ValueError(f"metadata field {name!r} holds a number that is not finite ({value!r}): JSON cannot store it")
    grade = extra.pop("grade", None)
    if grade is not None and grade not in scale:
        raise ValueError(f"grade must be an integer of the scale {scale.spec}, got {grade!r}")
    return (None if grade is None else int(grade)), extra


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as a formula (OWASP: CSV injection)


def inert(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs: text starting like a formula gets a leading quote
    (OWASP's advice); numbers, negative ones included, are written as they are."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def finite(value: Any) -> bool:
    """Whether a metadata value holds no NaN or infinity, however deeply nested."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True


def _apply(vectors: _USearch | _Overlay, keys: np.ndarray, vecs: np.ndarray, removed: np.ndarray) -> None:
    """Bring `vectors` up to date with logged changes (the net effect `Index._logged` read)."""
    if len(removed):
        vectors.remove(removed)
    if len(keys):
        vectors.add(keys, vecs)


class _Matches(NamedTuple):
    keys: np.ndarray  # (count,), or (queries, count) for a batch
    distances: np.ndarray
    counts: np.ndarray | None = None  # for a batch: how many of each row's entries are real


class _Overlay:
    """A memory-mapped usearch index (which cannot change) with the changes logged after it,
    searched as one: added vectors by brute force, removed keys filtered out. Readers use it so
    that opening stays a memory map however many changes are logged (at most Index.log_limit)."""

    def __init__(self, base: _USearch) -> None:
        self.base = base
        self.keys = np.empty(0, np.uint64)
        self.vecs = np.empty((0, base.ndim), np.float32)
        self.gone: set[int] = set()

    def __len__(self) -> int:
        return len(self.base) - len(self.gone) + len(self.keys)

    def add(self, keys: np.ndarray, vecs: np.ndarray) -> None:
        self.keys = np.concatenate([self.keys, np.asarray(keys, np.uint64)])
        self.vecs = np.vstack([self.vecs, np.asarray(vecs, np.float32)])

    def remove(self, keys: np.ndarray) -> None:
        added = np.isin(self.keys, keys)
        self.gone |= {int(k) for k in keys} - {int(k) for k in self.keys[added]}
        self.keys, self.vecs = self.keys[~added], self.vecs[~added]

    def search(self, vecs: np.ndarray, count: int, exact: bool = False) -> _Matches:
        """Like usearch's search: one query (1-D) or a batch (2-D, with counts)."""
        if vecs.ndim == 2:
            rows = [self.search(v, count, exact) for v in vecs]
            keys = np.zeros((len(rows), count), np.uint64)
            distances = np.full((len(rows), count), np.nan, np.float32)
            for i, r in enumerate(rows):
                keys[i, : len(r.keys)], distances[i, : len(r.keys)] = r.keys, r.distances
            return _Matches(keys, distances, np.array([len(r.keys) for r in rows]))
        keys, distances = self.keys, 1.0 - self.vecs @ vecs
        if len(self.base):
            found = self.base.search(vecs, min(len(self.base), count + len(self.gone)), exact=exact)
            keep = np.fromiter((int(k) not in self.gone for k in found.keys), bool, len(found.keys))
            keys = np.concatenate([found.keys[keep].astype(np.uint64), keys])
            distances = np.concatenate([found.distances[keep], distances])
        best = np.argsort(distances, kind="stable")[:count]
        return _Matches(keys[best], distances[best])


class Index:
    """A persistent case index. Create with `Index.create`, open with `Index.open`.

    Indexes of up to `exact_below` cases are searched exactly (brute force takes about a
    millisecond there); larger ones use usearch's HNSW graph, built with `connectivity` links
    per node and `expansion_add`, searched at depth `expansion_search` (four times usearch's
    default of 64, whose recall@10 was poor). The three are recorded in each index when it is
    created and read back when it is opened. Recall and speed at 100k and 1M cases:
    benchmarks/search_recall.py and benchmarks/RESULTS.md.
    """

    exact_below = 20_000
    connectivity = 32  # usearch's default is 16: recall@10 0.969 at 1M clustered vectors, 32: 0.993
    expansion_add = 128  # usearch's default
    expansion_search = 256
    lock_timeout = 30.0  # seconds a writer waits for another process's write to finish
    log_limit = 4096  # changes logged in SQLite before the vector file is rewritten (see `_commit`)

    def __init__(self, path: Path, conn: sqlite3.Connection, read_only: bool, model: Model | None) -> None:
        self._locked = False  # whether this process holds the writer lock now
        self._rebuilt = False  # whether the vectors in memory were rebuilt from SQLite, not read from their file
        self.path = path
        self._conn = conn
        self.read_only = read_only
        self._model = model
        self._runtime: tuple[Providers, int | None] = (None, None)  # how the default model runs when loaded
        self._secret: bytes | None = None  # the pseudonyms' secret, read from its key file when first needed
        self._info = dict(conn.execute("SELECT name, value FROM info").fetchall())
        if self._info.get("format") != FORMAT:
            raise CaseIndexError(f"{path}: index format {self._info.get('format')!r}, this version reads {FORMAT!r}")
        if model is not None and not self._built_with(model):
            raise ModelMismatchError(self._mismatch(model))
        self._vectors = self._load_vectors()
        self._loaded = self.generation
        if not read_only:
            self._tidy()

    def _tidy(self) -> None:
        """Remove a killed writer's leftovers now if no writer is at work (else the next write will)."""
        with os.fdopen(os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE), "r+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            claim(lock)
            self._locked = True
            try:
                self.refresh()
                if self._rebuilt:  # the file was missing or damaged: store the vectors rebuilt from SQLite
                    self._snapshot(self._vectors, self.generation)
                self._remove_leftovers()
            finally:
                self._locked = False

    def refresh(self) -> bool:
        """See what other processes committed since this index was opened or last refreshed.

        Searches and writes do this themselves; returns whether anything had changed.
        """
        self._info = dict(self._conn.execute("SELECT name, value FROM info").fetchall())
        if self.generation == self._loaded:
            return False
        if self._base <= self._loaded:  # the same vector file: apply only the changes logged since
            count, keys, vecs, removed = self._logged(since=self._loaded)
            if self._base <= self._loaded:
                _apply(self._vectors, keys, vecs, removed)
                if len(self._vectors) == count:
                    self._loaded = self.generation
                    return True
        self._vectors = self._load_vectors()
        self._loaded = self.generation
        return True

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """Hold the index's writer lock (one writing process at a time), on a fresh view."""
        if self.read_only:
            raise CaseIndexError(f"{self.path}: opened read-only")
        lock = os.fdopen(os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE), "r+")
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        lock.seek(0)
                        holder = lock.read().strip() or "another process"
                        raise CaseIndexError(
                            f"{self.path}: another writer holds the index ({holder}); waited {self.lock_timeout:.0f} s"
                        ) from None
                    time.sleep(0.05)
            claim(lock)
            self._locked = True
            self.refresh()
            yield
        finally:
            self._locked = False
            lock.close()  # releases the lock

    # -- opening and creating -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        model: Model | str | Path | None = None,
        dtype: str = "f16",
        root: str | Path | None = None,
        providers: Providers = None,
        threads: int | None = None,
    ) -> "Index":
        """A new, empty index in directory `path` (which must not exist or must be empty).

        `model` is the model whose vectors it will hold (None: the bundled default); `dtype`
        is how usearch stores vectors ("f16" halves memory; measured recall in benchmarks/).
        Photos' paths are stored absolute, or, with `root`, relative to that folder (recorded
        in the index) when they lie inside it, so an archive can move as a whole. `providers`
        and `threads` say how the model runs (see `Model.load`).
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CaseIndexError(f"{path}: already exists and is not an empty directory")
        m = model if isinstance(model, Model) else load_model(model, providers, threads)
        # Made aside and renamed into place: a kill during creation leaves no half-made index.
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(path, "creating")
        try:
            cls._create_in(staging, m, dtype, root)
            if path.is_dir():
                path.rmdir()  # empty, checked above
            staging.rename(path)
        except BaseException:  # a full disk, an interrupt: nothing half-made is left behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        log.info("created index %s for %s", path, m.name)
        return cls.open(path, model=m)

    @classmethod
    def _create_in(cls, staging: Path, m: Model, dtype: str, root: str | Path | None) -> None:
        """The files of a new, empty index for model `m`, in the directory `staging` (made here)."""
        staging.mkdir(mode=DIR_MODE)
        conn = sqlite3.connect(staging / DB_NAME, isolation_level=None, check_same_thread=False)
        os.chmod(staging / DB_NAME, FILE_MODE)
        conn.executescript(SCHEMA + CHANGES + VECTOR_LOG)
        info = {
            "format": FORMAT,
            "model_fingerprint": m.fingerprint,
            "model_weights": m.weights_fingerprint,  # what embedding files from before 0.4 record
            "model_name": m.name,
            "dim": str(m.dim),
            "dtype": dtype,
            "generation": "0",
            "vectors_generation": "0",
            "scale": m.scale.spec,
            "connectivity": str(cls.connectivity),
            "expansion_add": str(cls.expansion_add),
            "expansion_search": str(cls.expansion_search),
            "created": now(),
        } | ({"root": str(Path(root).resolve())} if root is not None else {})
        try:
            with conn:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO info VALUES (?, ?)", info.items())
        finally:
            conn.close()

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        model: Model | str | Path | None = None,
        providers: Providers = None,
        threads: int | None = None,
        **create: Any,
    ) -> "Index":
        """Open the index at `path` for writing, creating it (see `create`) when it does not exist yet."""
        if (Path(path) / DB_NAME).is_file():
            return cls.open(path, model=model, providers=providers, threads=threads)
        return cls.create(path, model=model, providers=providers, threads=threads, **create)

    @classmethod
    def open(
        cls,
        path: str | Path,
        read_only: bool = False,
        model: Model | str | Path | None = None,
        providers: Providers = None,
        threads: int | None = None,
    ) -> "Index":
        """Open an existing index. Read-only opening memory-maps the vectors (fast for big indexes).

        `model` is needed only to embed images, and only if the index was not built with the
        bundled default model; a model other than the index's raises ModelMismatchError.
        `providers` and `threads` say how the model runs (see `Model.load`).
        """
        path = Path(path)
        db = path / DB_NAME
        if not db.is_file():
            raise CaseIndexError(f"{path}: not a fundus-sdk index (no {DB_NAME})")
        m = model if isinstance(model, Model) or model is None else load_model(model, providers, threads)
        try:
            conn = _connect(db, read_only)
            try:
                index = cls(path, conn, read_only=read_only, model=m)
            except BaseException:
                conn.close()
                raise
        except sqlite3.DatabaseError as exc:
            raise CaseIndexError(
                f"{path}: cannot read {DB_NAME} ({exc}); restore the index from a backup, or create it again from the photos"
            ) from exc
        index._runtime = (providers, threads)
        return index

    def close(self) -> None:
        """Close the index (its database connection); `with Index.open(...)` does it for you."""
        self._conn.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"<Index {str(self.path)!r}: {len(self)} cases, {self._info.get('model_name')}, {mode}>"

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties ------------------------------------------------------------------------

    @property
    def model_fingerprint(self) -> str:
        """Fingerprint of the model whose vectors the index holds."""
        return self._info["model_fingerprint"]

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors."""
        return int(self._info["dim"])

    @property
    def scale(self) -> Scale:
        """The grading scale of the index's model: the grades a case may carry (indexes made
        before scales were recorded: ICDR 0-4)."""
        return Scale.parse(self._info.get("scale", ICDR.spec))

    @property
    def generation(self) -> int:
        """How many changes have been committed (names the current vector file)."""
        return int(self._info["generation"])

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]

    @property
    def last_key(self) -> int:
        """The highest key ever given (0: none). Keys are never reused, so cases added later have higher ones."""
        row = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'cases'").fetchone()
        return int(row[0]) if row else 0

    @property
    def model(self) -> Model:
        """The model that embeds images for this index (the bundled default unless given)."""
        if self._model is None:
            default = load_model(None, *self._runtime)
            if not self._built_with(default):
                raise ModelMismatchError(
                    self._mismatch(default) + "; open the index with model=<its model file>, or re-embed it for this "
                    "model with `fundus-sdk index rebuild OLD NEW` (fundus_sdk.rebuild)"
                )
            self._model = default
        return self._model

    def _built_with(self, model: Model) -> bool:
        """Whether this index holds `model`'s vectors. An index from before 0.4 recorded the weights'
        fingerprint alone (and no `model_weights`): it opens with the model whose weights match."""
        if "model_weights" not in self._info:
            return model.weights_fingerprint == self.model_fingerprint
        return model.fingerprint == self.model_fingerprint

    def _mismatch(self, model: Model) -> str:
        return (
            f"{self.path} was built with model {self._info.get('model_name')} "
            f"(fingerprint {self.model_fingerprint[:12]}), not {model.name} ({model.fingerprint[:12]})"
        )

    def grades(self) -> np.ndarray:
        """The grades of all graded cases (the gallery's class distribution)."""
        return np.array([r[0] for r in self._conn.execute("SELECT grade FROM cases WHERE grade IS NOT NULL")], dtype=int)

    def info(self) -> dict[str, Any]:
        """What the index is: size, model, dimension, storage, grade counts."""
        grades = dict(self._conn.execute("SELECT grade, COUNT(*) FROM cases GROUP BY grade").fetchall())
        return {
            "path": str(self.path),
            "cases": len(self),
            "grades": {("none" if g is None else str(g)): n for g, n in sorted(grades.items(), key=lambda x: (x[0] is None, x[0]))},
            **{k: v for k, v in self._info.items() if k != PSEUDONYM_KEY},  # the secret stays inside
        }

    # -- the vector file ---------------------------------------------------------------------

    def _vector_file(self, generation: int) -> Path:
        return self.path / f"vectors-{generation}.usearch"

    @property
    def _base(self) -> int:
        """The generation whose vector file is on disk; later changes are in the vector log.

        Indexes written before the log have no entry: their file is the current generation's.
        """
        return int(self._info.get("vectors_generation", self._info["generation"]))

    def _new_usearch(self) -> _USearch:
        return _USearch(
            ndim=self.dim, metric="cos", dtype=self._info["dtype"], connectivity=self._graph("connectivity"),
            expansion_add=self._graph("expansion_add"), expansion_search=self._graph("expansion_search"),
        )  # fmt: skip

    def _graph(self, name: str) -> int:
        """An HNSW setting as recorded at creation (indexes from before: the class's value)."""
        return int(self._info.get(name, getattr(type(self), name)))

    @contextmanager
    def _read_snapshot(self) -> Iterator[None]:
        """One consistent view of SQLite for several reads (no commit lands in between)."""
        if self._conn.in_transaction:
            yield
            return
        self._conn.execute("BEGIN")
        try:
            yield
        finally:
            self._conn.execute("COMMIT")

    def _logged(self, since: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """Read in one snapshot: the info table, the case count, and the net effect of the changes
        logged after generation `since`: (count, added keys, their vectors, removed keys)."""
        with self._read_snapshot():
            self._info = dict(self._conn.execute("SELECT name, value FROM info").fetchall())
            rows = (self._conn.execute("SELECT key, added FROM vector_log WHERE generation > ? ORDER BY id", (since,))
                    .fetchall() if self._has_table(LOG_TABLE) else [])  # fmt: skip
            added = {k for k, a in rows if a}
            removed = {k for k, a in rows if not a}  # keys are never reused: each is added and removed once at most
            keys, vecs = self._stored_vectors(sorted(added - removed))
            return len(self), keys, vecs, np.array(sorted(removed - added), dtype=np.uint64)

    def _load_vectors(self) -> _USearch:
        """The vectors to search: the base vector file plus the logged changes since it; rebuilt
        from SQLite when the file is missing, damaged or disagrees with it.

        A writer in another process may rewrite the vector file meanwhile and remove the old one:
        then the newer one is read instead.
        """
        for _ in range(20):
            base = self._base
            count, keys, vecs, removed = self._logged(since=base)
            if self._base != base:  # a writer rewrote the vector file since `base` was read
                continue
            file = self._vector_file(base)
            try:
                if file.is_file():
                    vectors = self._restore(file)
                else:  # generation 0 has no file: a new index's vectors are all in the log
                    vectors = self._new_usearch() if base == 0 else None
            except FileNotFoundError:  # removed while being read: a newer file is in place
                continue
            break
        else:
            vectors = None
        if vectors is not None:
            _apply(vectors, keys, vecs, removed)
        self._rebuilt = vectors is None or len(vectors) != count
        if self._rebuilt:
            log.warning("%s: vector file missing, damaged or stale; rebuilding it from %s (%d cases)",
                        self._vector_file(self._base), DB_NAME, count)  # fmt: skip
            with self._read_snapshot():
                self._info = dict(self._conn.execute("SELECT name, value FROM info").fetchall())
                vectors = self._vectors_from_sqlite()
            if self._locked:  # only the writer-lock holder writes files; others rebuild in memory
                self._snapshot(vectors, self.generation)
        return vectors

    def _restore(self, file: Path) -> _USearch | _Overlay | None:
        """The usearch index in `file` if its checksum is the recorded one, else None; memory-mapped
        under an _Overlay for the changes logged since when read-only, loaded when read-write."""
        recorded = self._info.get("vectors_sha256")
        if recorded is not None and file_sha256(file) != recorded:
            warnings.warn(f"{file}: checksum differs from the one recorded at commit; rebuilt from {DB_NAME}", stacklevel=4)
            return None
        try:
            header = _USearch.metadata(str(file))
            if header is None or header.get("count_deleted"):  # removed slots abort usearch's restore
                warnings.warn(f"{file}: holds removed vectors, which this usearch cannot read back; rebuilt from {DB_NAME}",
                              stacklevel=4)  # fmt: skip
                return None
            vectors = _USearch.restore(str(file), view=self.read_only)
        except Exception:  # usearch raises plain RuntimeErrors for damaged files
            return None
        vectors.expansion_search = self._graph("expansion_search")
        return _Overlay(vectors) if self.read_only else vectors

    def _vectors_from_sqlite(self) -> _USearch:
        """A usearch index of every vector SQLite holds (the source of truth)."""
        vectors = self._new_usearch()
        keys, vecs = self._stored_vectors()
        if len(keys):
            vectors.add(keys, vecs)
        return vectors

    def _stored_vectors(self, keys: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        if keys is None:
            rows = self._conn.execute("SELECT key, vector FROM cases ORDER BY key").fetchall()
        else:
            rows = []
            keys = list(keys)
            for i in range(0, len(keys), 900):
                part = keys[i : i + 900]
                rows += self._conn.execute(
                    f"SELECT key, vector FROM cases WHERE key IN ({','.join('?' * len(part))})", part
                ).fetchall()
        size = 4 * self.dim
        sized = [r for r in rows if isinstance(r[1], bytes) and len(r[1]) == size]
        ks = np.array([r[0] for r in sized], dtype=np.uint64)
        vs = np.frombuffer(b"".join(r[1] for r in sized), dtype=np.float32).reshape(len(sized), self.dim)
        whole = unit_rows(vs)
        if len(sized) < len(rows) or not whole.all():
            bad = sorted({r[0] for r in rows} - set(ks[whole].tolist()))
            warnings.warn(
                f"{self.path}: case(s) {', '.join(map(str, bad[:10]))} have a damaged stored vector and are left out of "
                "search (remove and re-add them)", stacklevel=3,
            )
            ks, vs = ks[whole], vs[whole]
        return ks, vs

    def _damaged_rows(self) -> list[int]:
        """Keys whose stored vector is not `dim` float32 values, finite and of unit norm."""
        size = 4 * self.dim
        return [k for (k, v) in self._conn.execute("SELECT key, vector FROM cases")
                if not isinstance(v, bytes) or len(v) != size or not unit_rows(np.frombuffer(v, np.float32)[None])[0]]  # fmt: skip

    def _snapshot(self, vectors: _USearch, generation: int) -> None:
        """Write `vectors` as `generation`'s vector file (aside, fsync, rename) and make it the base:
        its checksum recorded and the vector log emptied, in the caller's transaction or its own."""
        with write_atomically(self._vector_file(generation), mode=FILE_MODE) as tmp:
            try:
                vectors.save(str(tmp))
            except RuntimeError as exc:  # usearch's error for a failed write, e.g. a full disk
                raise OSError(errno.EIO, f"cannot write the vector file ({exc}; is the disk full?)", str(tmp)) from exc
            digest = file_sha256(tmp)
        own = not self._conn.in_transaction
        if own:
            self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(
                "INSERT OR REPLACE INTO info VALUES (?, ?)",
                [("vectors_generation", str(generation)), ("vectors_sha256", digest)],
            )
            self._conn.execute(f"DELETE FROM {LOG_TABLE}")
            if own:
                self._conn.execute("COMMIT")
        except BaseException:
            if own and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._info |= {"vectors_generation": str(generation), "vectors_sha256": digest}

    def _log(self, cur: sqlite3.Connection, keys: Sequence[int], added: bool) -> None:
        """Record, in the commit's transaction, that `keys` were added to (or removed from) the vectors."""
        generation = self.generation + 1  # the one being committed
        cur.executemany(f"INSERT INTO {LOG_TABLE} (generation, key, added) VALUES (?, ?, ?)",
                        [(generation, int(k), int(added)) for k in keys])  # fmt: skip

    def _commit(self, change) -> Any:
        """Run `change(cursor, vectors)` as one durable step, a SQLite transaction.

        The change is logged in SQLite (`_log`); once more than `log_limit` changes are logged,
        the vector file is rewritten in the same step, so a commit costs O(change) and rewriting
        the file is spread over `log_limit` changes.
        """
        with self._writer():
            new = self.generation + 1
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("INSERT OR IGNORE INTO info VALUES ('vectors_generation', ?)", (str(new - 1),))
                result = change(self._conn, self._vectors)
                self._conn.execute("UPDATE info SET value = ? WHERE name = 'generation'", (str(new),))
                if self._conn.execute(f"SELECT COUNT(*) FROM {LOG_TABLE}").fetchone()[0] > self.log_limit:
                    if self._vectors.stats.nodes > len(self._vectors):  # removed slots, which usearch 2.25 saves
                        self._vectors = self._vectors_from_sqlite()  # but cannot read back: a fresh index has none
                    self._snapshot(self._vectors, new)
                self._conn.execute("COMMIT")
            except BaseException as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                self._vector_file(new).unlink(missing_ok=True)
                self._vectors = self._load_vectors()
                self._loaded = self.generation
                if isinstance(exc, sqlite3.Error):  # e.g. a full disk at commit
                    raise CaseIndexError(f"{self.path}: the change could not be committed ({exc}); the index is as it was") from exc
                raise
            self._info["generation"] = str(new)
            self._loaded = new
            self._remove_leftovers()
            log.debug("%s: committed generation %d (%d cases)", self.path, new, len(self._vectors))
            return result

    def _leftovers(self) -> list[Path]:
        """Files no reader needs: other generations' vector files, writers' temporary files."""
        current = self._vector_file(self._base)
        return [p for p in self.path.iterdir()
                if (p.name.startswith(".vectors-") and p.name.endswith(".tmp"))
                or (p.name.startswith("vectors-") and p.suffix == ".usearch" and p != current)]  # fmt: skip

    def _remove_leftovers(self) -> None:
        """Under the writer lock no other writer has a file in flight: what is left is a dead one's."""
        for p in self._leftovers():
            p.unlink(missing_ok=True)

    # -- adding and removing -----------------------------------------------------------------

    def _vectors_given(self, items: object) -> np.ndarray | None:
        """The input as an (n, dim) float array if it is vectors rather than images."""
        if isinstance(items, np.ndarray) and items.dtype.kind == "f" and items.ndim in (1, 2):
            vecs = np.atleast_2d(items).astype(np.float32)
            if vecs.shape[1] != self.dim:
                raise ModelMismatchError(f"vectors have dimension {vecs.shape[1]}, {self.path} holds {self.dim}")
            if not unit_rows(vecs).all():
                raise ValueError("vectors must be finite and unit-norm (as embed() returns them)")
            return vecs
        return None

    # -- paths and references --------------------------------------------------------------

    @property
    def root(self) -> Path | None:
        """The folder stored paths are relative to (None: paths are stored absolute)."""
        return Path(self._info["root"]) if self._info.get("root") else None

    def _stored_path(self, path: str | Path) -> str:
        real = Path(path).resolve()
        if self.root is not None and real.is_relative_to(self.root):
            return real.relative_to(self.root).as_posix()
        return str(real)

    def _public_path(self, stored: str | None) -> str | None:
        if stored is None or self.root is None or Path(stored).is_absolute():
            return stored
        return str(self.root / stored)

    def _key_of(self, ref: CaseRef) -> int | None:
        """The key of a case named by key, sha256 or photo path (None when there is none)."""
        if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
            row = self._conn.execute("SELECT key FROM cases WHERE key = ?", (int(ref),)).fetchone()
        elif isinstance(ref, str) and len(ref) == 64 and all(c in "0123456789abcdef" for c in ref):
            row = self._conn.execute("SELECT key FROM cases WHERE sha256 = ?", (ref,)).fetchone()
        elif isinstance(ref, (str, Path)):
            row = self._conn.execute("SELECT key FROM cases WHERE path = ?", (self._stored_path(ref),)).fetchone()
        else:
            raise TypeError(f"a case is named by its key, sha256 or path, got {type(ref).__name__}")
        return None if row is None else row[0]

    def _case(self, row: tuple) -> Case:
        key, path, sha, grade, meta, added = row
        return Case(key, self._public_path(path), sha, grade, json.loads(meta), added)

    # -- reading cases -------------------------------------------------------------------------

    def holds(self, ref: CaseRef) -> bool:
        """Whether a case named by key, sha256 or photo path is in the index."""
        return self._key_of(ref) is not None

    def get(self, ref: CaseRef) -> Case:
        """The case named by its key, sha256 or photo path; KeyError when the index has none."""
        key = self._key_of(ref)
        if key is None:
            raise KeyError(f"{self.path} has no case {ref!r}")
        row = self._conn.execute("SELECT key, path, sha256, grade, meta, added FROM cases WHERE key = ?", (key,)).fetchone()
        return self._case(row)

    def __iter__(self) -> Iterator[Case]:
        """Every case, by key (without vectors)."""
        rows = self._conn.execute("SELECT key, path, sha256, grade, meta, added FROM cases ORDER BY key")
        return (self._case(r) for r in rows.fetchall())

    def cases(self, where: Where | None = None, exclude: Where | None = None) -> list[Case]:
        """The cases matching a filter (see fundus_sdk.filters), by key."""
        condition, params = compile_filter(where, exclude, self.fields())
        rows = self._conn.execute(
            f"SELECT key, path, sha256, grade, meta, added FROM cases WHERE {condition} ORDER BY key", params
        ).fetchall()
        return [self._case(r) for r in rows]

    def fields(self) -> list[str]:
        """The fields a filter may name: the columns and every metadata field some case has."""
        rows = self._conn.execute("SELECT DISTINCT j.key FROM cases, json_each(cases.meta) AS j").fetchall()
        return list(COLUMNS) + sorted(r[0] for r in rows if r[0] not in COLUMNS)

    def history(self, ref: CaseRef | None = None) -> list[Change]:
        """Recorded changes of stored values, oldest first (of one case, or of all); a removed
        case's history by its key. KeyError for a case that never was."""
        if not self._has_table("changes"):
            return []
        if ref is None:
            rows = self._conn.execute("SELECT key, at, field, old, new FROM changes ORDER BY id").fetchall()
        else:
            key = self._key_of(ref)
            if key is None and isinstance(ref, (int, np.integer)):  # a removed case keeps its history
                key = int(ref)
            rows = self._conn.execute("SELECT key, at, field, old, new FROM changes WHERE key = ? ORDER BY id", (key,)).fetchall()
            if not rows and self._key_of(ref) is None:
                raise KeyError(f"{self.path} has no case {ref!r}")
        return [Change(k, at, f, json.loads(o) if o is not None else None, json.loads(n) if n is not None else None)
                for k, at, f, o, n in rows]  # fmt: skip

    def _has_table(self, name: str) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    def export(self, out: str | Path, fmt: str | None = None) -> int:
        """Write every case (all but the vectors) as CSV or JSON Lines (by `fmt` or the suffix) to
        `out` ("-": standard output; see fundus_sdk.atomic.write_output); returns how many. CSV
        columns: key, path, sha256, grade, added, then the metadata fields; text a spreadsheet
        would run as a formula is written inert (`inert`)."""
        fmt = fmt or ("jsonl" if Path(out).suffix.lower() in (".jsonl", ".json") else "csv")
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"export format must be csv or jsonl, got {fmt!r}")
        cases = list(self)
        with write_output(out) as f:
            if fmt == "jsonl":
                for case in cases:
                    f.write(json.dumps(case.to_dict()) + "\n")
            elif fmt == "csv":
                extra = [name for name in self.fields() if name not in COLUMNS]
                writer = csv.writer(f)
                writer.writerow([*COLUMNS, *extra])
                for c in cases:
                    row = [c.key, c.path, c.sha256, c.grade, c.added, *(c.metadata.get(n, "") for n in extra)]
                    writer.writerow([inert(v) for v in row])
        return len(cases)

    def check(self, repair: bool = False) -> dict[str, Any]:
        """Consistency of the index: rows, searchable vectors, the vector file's checksum, damaged
        rows and leftover files. With `repair` (read-write), the vector file is rewritten from
        SQLite and leftovers of interrupted writers are removed."""
        self.refresh()
        file = self._vector_file(self._base)
        rows = len(self)
        logged = self._conn.execute(f"SELECT COUNT(*) FROM {LOG_TABLE}").fetchone()[0] if self._has_table(LOG_TABLE) else 0
        damaged = self._damaged_rows()
        recorded = self._info.get("vectors_sha256")
        leftovers = self._leftovers()
        report = {
            "path": str(self.path),
            "rows": rows,
            "vectors": len(self._vectors),
            "vector_file": file.name if file.is_file() else None,
            "logged_changes": logged,  # since the vector file was written; applied at opening
            "checksum": ("not written yet" if self._base == 0 else "missing") if not file.is_file() else
                        ("not recorded" if recorded is None else ("ok" if file_sha256(file) == recorded else "differs")),
            "damaged_rows": damaged,
            "leftover_files": sorted(p.name for p in leftovers),
        }  # fmt: skip
        report["ok"] = (  # leftovers are only garbage of a killed writer: reported, removed by the next write
            report["rows"] == report["vectors"] + len(damaged) and report["checksum"] in ("ok", "not recorded", "not written yet")
            and not damaged
        )  # fmt: skip
        if repair and not (report["ok"] and not leftovers):
            with self._writer():
                self._vectors = self._vectors_from_sqlite()
                self._snapshot(self._vectors, self.generation)
                self._remove_leftovers()
            report["repaired"] = True
        return report

    # -- adding, correcting and removing ---------------------------------------------------------

    def add(
        self,
        items: ImageInput | Sequence[ImageInput] | np.ndarray,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        paths: Sequence[str | None] | None = None,
        hashes: Sequence[str | None] | None = None,
        verdicts: Sequence[dict[str, Any] | None] | None = None,
        model_fingerprint: str | None = None,
        on_error: OnError = "raise",
        on_conflict: str | Callable[[Conflict], None] = "keep",
        batch_size: int = 16,
        commit_every: int | None = None,
        commit_seconds: float | None = None,
        progress: Callable[[int], None] | None = None,
        check: bool = True,
        keep_identifiers: bool = False,
    ) -> list[int | None]:
        """Add images (or vectors from this index's model) with per-case metadata; return keys.

        Metadata dicts may hold "grade" (an integer of the index's `scale`) and any other fields
        (kept as JSON, filterable); the index derives key, path, sha256 and added itself and
        refuses them as metadata. Each image is identified (sha256) before it is decoded: a photo
        the index holds is not embedded again, its key is returned, and metadata other than the
        stored one is a Conflict: "keep" (the default) keeps the stored values and warns,
        "update" stores the new ones (recorded in `history`), a callable receives each Conflict.
        Vectors need `model_fingerprint` (vectors from another model are refused) and may come
        with `paths`, `hashes` and the input gate's `verdicts` (as `embed` writes them: their
        gradability is stored). With on_error="skip" (or a callable), unreadable images are
        reported and their key is None. The whole call is one atomic change unless
        `commit_every` (inputs) or `commit_seconds` is given: then each step is committed, and an
        interruption keeps every finished step. `progress(n)` after each batch, n inputs handled.
        With `check` (the default) each image passes the model's input gate: one that is not a
        colour fundus photograph is a NotFundusError (an ImageError, handled by `on_error`), and
        the gate's gradability score is stored as the case's "gradability" field.
        DICOM inputs add their header's fields (eye, UIDs, acquisition date, manufacturer, model,
        frame; fundus_sdk.dicom) under the caller's metadata, and a keyed pseudonym of the
        PatientID as "patient_pseudonym" (the same patient, the same pseudonym, in this index
        only); names, IDs, dates of birth and other identifiers are stored only with
        `keep_identifiers`.
        """
        if self.read_only:
            raise CaseIndexError(f"{self.path}: opened read-only")
        failed = error_policy(on_error)
        if on_conflict not in ON_CONFLICT and not callable(on_conflict):
            raise ValueError(f"on_conflict must be one of {ON_CONFLICT} or a callable, got {on_conflict!r}")
        vecs = self._vectors_given(items)
        known = (self.model_fingerprint, self._info.get("model_weights"))
        if vecs is not None and model_fingerprint is not None and model_fingerprint not in known:
            raise ModelMismatchError(
                f"these vectors come from model {model_fingerprint[:12]}; {self.path} holds vectors of "
                f"{self._info.get('model_name')} ({self.model_fingerprint[:12]})"
            )
        inputs = list(vecs) if vecs is not None else as_list(items)
        n = len(inputs)
        scale = self.scale
        meta = [check_metadata(m, scale) for m in (metadata if metadata is not None else [None] * n)]
        for name, given in (("metadata", meta), ("paths", paths), ("hashes", hashes), ("verdicts", verdicts)):
            if given is not None and len(given) != n:
                raise ValueError(f"{n} inputs but {len(given)} {name}")
        keys: list[int | None] = [None] * n
        pending: list[tuple] = []  # rows to insert: (position, path, sha256, grade, meta json, vector)
        last_commit = time.monotonic()

        def commit() -> None:
            nonlocal pending, last_commit
            if pending:
                rows, pending = pending, []
                for pos, key in self._commit(lambda cur, vectors: self._insert(cur, vectors, rows)):
                    keys[pos] = key
            last_commit = time.monotonic()

        def due() -> bool:
            return bool(
                (commit_every and len(pending) >= commit_every)
                or (commit_seconds is not None and time.monotonic() - last_commit >= commit_seconds)
            )

        if vecs is not None:
            for pos, vec in enumerate(inputs):
                grade, extra = meta[pos]
                path = paths[pos] if paths is not None else None
                sha = hashes[pos] if hashes is not None else None
                if sha and self._known(sha, pos, grade, extra, keys, on_conflict):
                    continue
                if verdicts is not None and verdicts[pos]:
                    extra = {**extra, "gradability": verdicts[pos]["gradability"]}
                pending.append((pos, path, sha, grade, json.dumps(extra, default=str), vec))
                if due():
                    commit()
            commit()
            return keys

        # Images: identify first, embed only what the index does not hold yet.
        new: dict[str, int] = {}  # sha256 -> position of its first occurrence in this call
        copies: list[tuple[int, str]] = []  # later occurrences of a photo in this call
        todo, todo_pos, todo_sha = [], [], []
        for pos, item in enumerate(inputs):
            try:
                sha, decodable = identify(item)
            except ImageError as err:
                failed(err)
                continue
            grade, extra = meta[pos]
            if sha in new:  # the same photo twice in this call: one case
                copies.append((pos, sha))
                continue
            if self._known(sha, pos, grade, extra, keys, on_conflict):
                if progress is not None:
                    progress(1)
                continue
            new[sha] = pos
            todo.append(decodable)
            todo_pos.append(pos)
            todo_sha.append(sha)
        for batch in self.model.iter_embed(todo, batch_size=batch_size, check=check):
            for err in batch.errors:
                failed(err)  # raises under on_error="raise", before this step is committed
            for i, vec, sha, verdict, found, who in zip(
                batch.positions, batch.vectors, batch.sha256, batch.verdicts, batch.metadata, batch.identifiers
            ):
                pos = todo_pos[i]
                item = inputs[pos]
                if sha != todo_sha[i]:  # the bytes decoded are not those identified: never store one under the other
                    failed(ImageError(describe(item), "the file changed while it was being added; add it again"))
                    continue
                if verdict is not None and not verdict.fundus:
                    failed(NotFundusError(item, verdict))
                    continue
                grade, extra = meta[pos]
                extra = {**found, **self._patient(who, keep_identifiers), **extra}
                if verdict is not None:
                    extra = {**extra, "gradability": verdict.gradability}
                source = item.path if isinstance(item, Frame) else item  # a DICOM frame: its file
                path = paths[pos] if paths else (self._stored_path(source) if isinstance(source, (str, Path)) else None)
                pending.append((pos, path, todo_sha[i], grade, json.dumps(extra, default=str), vec))
            if progress is not None:
                progress(len(batch.positions) + len(batch.errors))
            if due():
                commit()
        commit()
        for pos, sha in copies:
            keys[pos] = keys[new[sha]]
        log.info("%s: %d of %d inputs added or already held, %d not", self.path, sum(k is not None for k in keys), n,
                 sum(k is None for k in keys))  # fmt: skip
        return keys

    def _known(self, sha, pos, grade, extra, keys, on_conflict) -> bool:
        """Whether the index holds this photo already; if so record its key and settle conflicts."""
        row = self._conn.execute("SELECT key, path, grade, meta FROM cases WHERE sha256 = ?", (sha,)).fetchone()
        if row is None:
            return False
        key, stored_path, stored_grade, stored_meta = row
        keys[pos] = key
        stored = json.loads(stored_meta) | {"grade": stored_grade}
        given = extra | ({"grade": grade} if grade is not None else {})
        conflicts = [
            Conflict(key, self._public_path(stored_path), name, stored.get(name), value)
            for name, value in given.items()
            if stored.get(name) != value
        ]
        if not conflicts:
            return True
        if on_conflict == "update":
            self.update(key, {c.field: c.given for c in conflicts})
        elif callable(on_conflict):
            for c in conflicts:
                on_conflict(c)
        else:
            warnings.warn(
                "kept the stored values (on_conflict='update' stores the new ones): " + "; ".join(map(str, conflicts)),
                stacklevel=3,
            )
        return True

    def _patient(self, identifiers: dict[str, str], keep: bool) -> dict[str, Any]:
        """What a case may say of its patient: a pseudonym of the PatientID, the identifiers only if kept."""
        out: dict[str, Any] = dict(identifiers) if keep else {}
        if identifiers.get("PatientID"):
            if self._secret is None:
                self._secret = self._pseudonym_secret()
            out["patient_pseudonym"] = hmac.new(self._secret, identifiers["PatientID"].encode(), hashlib.sha256).hexdigest()[:20]
        return out

    def _pseudonym_secret(self) -> bytes:
        """The pseudonyms' secret (see PSEUDONYM_FILE): the hospital's key file, else this index's,
        made (or moved out of an older index's database) under the writer lock when first needed."""
        supplied = os.environ.get(PSEUDONYM_ENV)
        file = Path(supplied) if supplied else self.path / PSEUDONYM_FILE
        if not file.is_file():
            if supplied:
                raise CaseIndexError(f"{PSEUDONYM_ENV}={supplied}: no such key file")
            with self._writer():
                if not file.is_file():
                    with write_atomically(file, mode=FILE_MODE) as tmp:
                        tmp.write_text(self._info.get(PSEUDONYM_KEY) or secrets.token_hex(32))
                self._conn.execute("PRAGMA secure_delete = ON")  # the old secret's bytes are overwritten, not freed
                with self._conn:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.execute("DELETE FROM info WHERE name = ?", (PSEUDONYM_KEY,))
                self._conn.execute("PRAGMA secure_delete = OFF")
            self.refresh()
        try:
            return bytes.fromhex(file.read_text().strip())
        except ValueError:
            raise CaseIndexError(f"{file}: the pseudonym key must be hexadecimal text") from None

    def update(self, ref: CaseRef, values: dict[str, Any]) -> Case:
        """Set metadata fields of one case (named by key, sha256 or path); None removes a field.

        Every change is recorded with its time, old and new value (see `history`).
        """
        if self.read_only:
            raise CaseIndexError(f"{self.path}: opened read-only")
        key = self._key_of(ref)
        if key is None:
            raise KeyError(f"{self.path} has no case {ref!r}")
        grade, extra = check_metadata({k: v for k, v in values.items() if v is not None}, self.scale)
        removed = [k for k, v in values.items() if v is None]
        if "grade" in removed:
            raise ValueError("a case's grade can be corrected, not removed")
        at = now()
        with self._writer():
            self._update(key, grade, extra, removed, at)
        return self.get(key)

    def _update(self, key: int, grade: int | None, extra: dict[str, Any], removed: list[str], at: str) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            stored_grade, stored_meta = self._conn.execute("SELECT grade, meta FROM cases WHERE key = ?", (key,)).fetchone()
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
            self._conn.execute(
                "UPDATE cases SET grade = ?, meta = ? WHERE key = ?", (stored_grade, json.dumps(meta, default=str), key)
            )
            self._conn.executemany(
                "INSERT INTO changes (key, at, field, old, new) VALUES (?, ?, ?, ?, ?)",
                [(key, at, f, None if o is None else json.dumps(o, default=str), None if v is None else json.dumps(v, default=str))
                 for f, o, v in changes],
            )  # fmt: skip
            self._conn.execute("COMMIT")
        except BaseException as exc:
            if self._conn.in_transaction:  # SQLite may have rolled back itself (a full disk): keep the cause
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise CaseIndexError(f"{self.path}: the change could not be committed ({exc}); the index is as it was") from exc
            raise

    def _insert(
        self, cur: sqlite3.Connection, vectors: _USearch, rows: list[tuple], keep: list[tuple[int, str]] | None = None
    ) -> list[tuple[int, int]]:
        """Insert (position, path, sha256, grade, meta json, vector) rows; `keep` gives rows their
        (key, added) from another index (a rebuild keeps both)."""
        added, new_keys, new_vecs = [], [], []
        at = now()
        for i, (pos, path, sha, grade, meta_json, vec) in enumerate(rows):
            existing = cur.execute("SELECT key FROM cases WHERE sha256 = ?", (sha,)).fetchone() if sha else None
            if existing:
                added.append((pos, existing[0]))
                continue
            key, when = keep[i] if keep is not None else (None, at)
            key = cur.execute(
                "INSERT INTO cases (key, path, sha256, grade, meta, added, vector) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, path, sha, grade, meta_json, when, np.asarray(vec, dtype=np.float32).tobytes()),
            ).lastrowid
            added.append((pos, key))
            new_keys.append(key)
            new_vecs.append(vec)
        if new_keys:
            vectors.add(np.array(new_keys, dtype=np.uint64), np.stack(new_vecs).astype(np.float32))
            self._log(cur, new_keys, added=True)
        return added

    def remove(self, refs: Sequence[CaseRef]) -> int:
        """Remove cases named by key, sha256 or path; returns how many were there. Each removal is
        recorded in the history (field "case": its sha256 and grade), and the patient identifiers
        the case held (`keep_identifiers`) are purged from the history with it."""
        keys = sorted({k for k in (self._key_of(r) for r in refs) if k is not None})

        at = now()

        def change(cur: sqlite3.Connection, vectors: _USearch) -> int:
            gone = [(k, *row) for k in keys for row in cur.execute("SELECT sha256, grade FROM cases WHERE key = ?", (k,))]
            cur.executemany("DELETE FROM cases WHERE key = ?", [(k,) for k in keys])
            for key, _, _ in gone:  # identifiers kept with keep_identifiers leave with their case
                cur.executemany("DELETE FROM changes WHERE id = ?",
                                [(i,) for i, f in cur.execute("SELECT id, field FROM changes WHERE key = ?", (key,)) if identifying(f)])  # fmt: skip
            cur.executemany(
                "INSERT INTO changes (key, at, field, old, new) VALUES (?, ?, 'case', ?, NULL)",
                [(key, at, json.dumps({"sha256": sha, "grade": grade})) for key, sha, grade in gone],
            )
            if keys:
                vectors.remove(np.array(keys, dtype=np.uint64))
                self._log(cur, keys, added=False)
            return len(keys)

        return self._commit(change)

    # -- searching -----------------------------------------------------------------------------

    def search(
        self,
        query: ImageInput | np.ndarray,
        k: int = 10,
        where: Where | None = None,
        exclude: Where | None = None,
        check: bool = True,
    ) -> list[Hit]:
        """The k most similar cases (cosine similarity) for one query, best first.

        `query` is one image (path, bytes, file object, PIL image, HxWx3 array, DICOM frame) or
        one unit vector from this index's model; several queries go to `search_batch`.
        `where` keeps only cases matching it and `exclude` drops those matching it (see
        fundus_sdk.filters), e.g. where={"grade": [2, 3]}, exclude={"patient": 10310}; k hits
        are still returned when k such cases exist. With `check` (the default) an image query
        passes the model's input gate first: one that is not a colour fundus photograph raises
        NotFundusError (its neighbours would mean nothing), an ungradable one warns
        (UngradableWarning).
        """
        vecs = self._vectors_given(query)
        several = (vecs is not None and np.asarray(query).ndim == 2) or isinstance(query, (list, tuple)) or (
            isinstance(query, np.ndarray) and query.ndim == 4
        )
        if several:
            raise TypeError("search() takes one query; use search_batch() for several")
        return self.search_batch([query] if vecs is None else vecs, k, where, exclude, check)[0]

    def search_batch(
        self,
        queries: Sequence[ImageInput] | np.ndarray,
        k: int = 10,
        where: Where | None = None,
        exclude: Where | None = None,
        check: bool = True,
        on_error: OnError = "raise",
    ) -> BatchHits:
        """The k most similar cases for each of several queries (images, or a 2-D array of
        vectors), in query order; the filter is computed once for all. See `search`.

        on_error: "raise" (default) raises the first query that cannot be read or is not a fundus
        photograph; "skip" warns and answers the others (the bad query's hits are empty); a
        callable receives each such ImageError instead of the warning."""
        self.refresh()
        allowed = self._filter_keys(where, exclude) if (where or exclude) else None
        vecs = self._vectors_given(queries)
        if vecs is None:
            vecs, _ = self.embed_queries(as_list(queries), check, on_error)
        vecs = np.atleast_2d(vecs)
        answered = np.flatnonzero(np.isfinite(vecs).all(axis=1))
        results: list[list[Hit]] = [[] for _ in vecs]
        if allowed is None:  # one batched search (usearch runs it on every core)
            for i, (keys, sims) in zip(answered, self._nearest(vecs[answered], k) if len(answered) else []):
                results[i] = self._hits(keys, sims)
        else:
            for i in answered:
                results[i] = self._search_one(vecs[i], k, allowed)
        return BatchHits(results)

    def embed_queries(
        self, queries: list[ImageInput], check: bool = True, on_error: OnError = "raise"
    ) -> tuple[np.ndarray, list[Verdict | None]]:
        """The vectors `search` uses for image queries, with the input gate's verdicts.

        With `check`, a query that is not a colour fundus photograph is a NotFundusError and an
        ungradable one warns (UngradableWarning); an unreadable one is its ImageError. Errors go
        to `on_error` (see `search_batch`); a failed query's row is NaN.
        """
        failed = error_policy(on_error)
        vecs = np.full((len(queries), self.dim), np.nan, np.float32)
        verdicts: list[Verdict | None] = [None] * len(queries)
        for batch in self.model.iter_embed(queries, check=check):
            for err in batch.errors:
                failed(err)
            for i, vec, verdict in zip(batch.positions, batch.vectors, batch.verdicts):
                if verdict is not None and not verdict.fundus:
                    failed(NotFundusError(queries[i], verdict))
                    continue
                if verdict is not None and not verdict.gradable:
                    warnings.warn(f"{describe(queries[i])}: {verdict.summary()}", UngradableWarning, stacklevel=3)
                vecs[i], verdicts[i] = vec, verdict
        return vecs, verdicts

    def _filter_keys(self, where: Where | None, exclude: Where | None) -> np.ndarray:
        condition, params = compile_filter(where, exclude, self.fields())
        rows = self._conn.execute(f"SELECT key FROM cases WHERE {condition}", params).fetchall()
        return np.array([r[0] for r in rows], dtype=np.uint64)

    def _nearest(self, vecs: np.ndarray, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, similarities) of the `count` nearest cases to each row of `vecs`, best first, by
        one search: exact up to `exact_below` cases, else through the HNSW graph."""
        total = len(self._vectors)
        if total == 0 or count <= 0:
            return [(np.empty(0, np.uint64), np.empty(0, np.float32)) for _ in vecs]
        found = self._vectors.search(vecs if len(vecs) > 1 else vecs[0], min(count, total), exact=total <= self.exact_below)
        if len(vecs) == 1:
            return [(found.keys, 1.0 - found.distances)]
        return [(found.keys[i, :c], 1.0 - found.distances[i, :c]) for i, c in enumerate(found.counts)]

    def _search_one(self, vec: np.ndarray, k: int, allowed: np.ndarray) -> list[Hit]:
        """The k nearest cases among the `allowed` keys."""
        total = len(self._vectors)
        if total == 0 or k <= 0:
            return []
        exact = total <= self.exact_below
        if len(allowed) == 0:
            return []
        want = min(k, len(allowed))
        if len(allowed) > max(4096, total // 20):
            # a broad filter: oversample the approximate search until enough hits pass it
            allowed_set = set(allowed.tolist())
            count = min(total, want * 2 * -(-total // len(allowed)))
            while True:
                found = self._vectors.search(vec, count, exact=exact)
                mask = np.fromiter((int(key) in allowed_set for key in found.keys), bool, len(found.keys))
                if mask.sum() >= want:
                    return self._hits(found.keys[mask][:want], (1.0 - found.distances)[mask][:want])
                if count >= total:
                    break
                count = min(total, count * 2)
        # a narrow filter (or an approximate search that fell short): exact search over the allowed
        keys, vs = self._stored_vectors(allowed.tolist())
        sims = vs @ vec
        top = np.argsort(-sims)[:want]
        return self._hits(keys[top], sims[top])

    def _hits(self, keys: np.ndarray, scores: np.ndarray) -> list[Hit]:
        keys = [int(k) for k in keys]
        if not keys:
            return []
        rows = self._conn.execute(
            f"SELECT key, path, sha256, grade, meta, added FROM cases WHERE key IN ({','.join('?' * len(keys))})", keys
        ).fetchall()
        by_key = {r[0]: r for r in rows}
        return [
            Hit(key, self._public_path(r[1]), r[2], r[3], json.loads(r[4]), r[5], score=float(s))
            for key, s in zip(keys, scores)
            if (r := by_key.get(key)) is not None
        ]


@dataclass
class RebuildReport:
    """What `rebuild` did: the new index's path, the cases carried over, and those it could not
    re-embed because their photo is gone or its content changed (sha256 differs)."""

    path: Path
    rebuilt: int
    missing: list[Case]
    changed: list[Case]
    unreadable: list[tuple[Case, str]]


def photo_of(case: Case) -> str | Frame:
    """The input a case's photo is read from: its file, or the frame of a multi-frame DICOM file."""
    if "frame" in case.metadata and isinstance(case.metadata["frame"], int) and looks_like_dicom(Path(case.path)):
        frames = dicom_frames(case.path)
        return frames[case.metadata["frame"] - 1]
    return case.path


def rebuild(
    old: str | Path,
    new: str | Path,
    model: Model | str | Path | None = None,
    *,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> RebuildReport:
    """A new index at `new` with every case of `old` re-embedded by `model` (None: the bundled one).

    For a new model, so that no index is stranded: each case whose photo is still at its path
    with the same content (sha256) is embedded again and keeps its key, grade, metadata, date
    added and history; the others are listed in the report. `old` is only read.
    """
    m = model if isinstance(model, Model) else load_model(model)
    new = Path(new)
    if new.exists() and (not new.is_dir() or any(new.iterdir())):
        raise CaseIndexError(f"{new}: already exists and is not an empty directory")
    with Index.open(old, read_only=True) as src:
        cases, history, info = list(src), src.history(), src._info
        key_file = src.path / PSEUDONYM_FILE
        old_key = key_file.read_text() if key_file.is_file() else info.get(PSEUDONYM_KEY)
    # Built aside and renamed into place when complete: a kill leaves no half-built index at `new`.
    staging = staging_dir(new, "rebuilding")
    try:
        built = _rebuild_into(staging, m, cases, history, info, old_key, batch_size, progress)
        if new.is_dir():
            new.rmdir()  # empty, checked above
        staging.rename(new)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(new.parent)
    return replace(built, path=new)


def _rebuild_into(staging: Path, m: Model, cases: list[Case], history: list[Change], info: dict[str, str],
                  old_key: str | None, batch_size: int, progress: Callable[[int], None] | None) -> RebuildReport:  # fmt: skip
    """`rebuild`'s work, into a new index at `staging`."""
    missing, changed, unreadable, todo = [], [], [], []
    for case in cases:
        if case.path is None or not Path(case.path).is_file():
            missing.append(case)
            continue
        try:
            sha, _ = identify(photo_of(case))
        except ImageError as err:
            unreadable.append((case, err.reason))
            continue
        (todo if sha == case.sha256 else changed).append(case)
    with Index.create(staging, model=m, dtype=info.get("dtype", "f16"), root=info.get("root")) as dst:
        if old_key is not None:  # the same patients keep their pseudonyms in the new index
            with write_atomically(dst.path / PSEUDONYM_FILE, mode=FILE_MODE) as tmp:
                tmp.write_text(old_key)
        rows, keep = [], []
        sources = [photo_of(c) for c in todo]
        for batch in m.iter_embed(sources, batch_size=batch_size, check=False):
            for err in batch.errors:
                unreadable.append((next(c for c, s in zip(todo, sources) if str(s) == err.source), err.reason))
            for i, vec, sha in zip(batch.positions, batch.vectors, batch.sha256):
                c = todo[i]
                if sha != c.sha256:  # changed since it was identified above
                    changed.append(c)
                    continue
                rows.append((i, dst._stored_path(c.path), c.sha256, c.grade, json.dumps(c.metadata, default=str), vec))
                keep.append((c.key, c.added))
            if progress is not None:
                progress(len(batch.positions) + len(batch.errors))
        dst._commit(lambda cur, vectors: dst._insert(cur, vectors, rows, keep))
        dst._conn.executemany(
            "INSERT INTO changes (key, at, field, old, new) VALUES (?, ?, ?, ?, ?)",
            [(c.key, c.at, c.field, None if c.old is None else json.dumps(c.old), None if c.new is None else json.dumps(c.new))
             for c in history if c.key in {k for k, _ in keep}],
        )  # fmt: skip
        return RebuildReport(dst.path, len(rows), missing, changed, unreadable)


def search(
    query: ImageInput | Sequence[ImageInput] | np.ndarray,
    index: Index | str | Path,
    k: int = 10,
    where: Where | None = None,
    exclude: Where | None = None,
    check: bool = True,
) -> list[Hit]:
    """The nearest cases for one query, best first (an index or its directory); see Index.search."""
    if isinstance(index, Index):
        return index.search(query, k=k, where=where, exclude=exclude, check=check)
    with Index.open(index, read_only=True) as ix:
        return ix.search(query, k=k, where=where, exclude=exclude, check=check)
