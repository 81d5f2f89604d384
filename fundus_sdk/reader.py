"""Reading an index directory: snapshots that threads share, records, and search by vector.

Why threads can share one Reader: a search reads an immutable `Snapshot` (generation, info,
vectors) and each thread reads SQLite through its own connection. When another process has
committed, the next search builds a new snapshot (for a memory-mapped vector file, only the
logged changes are copied) and swaps it in, while searches in flight finish on the old one.
Nothing a search does changes what another thread sees.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import vectors as vec
from .contract import unit_rows
from .disk import CASE_SELECT, DB_NAME, FORMAT, LOG_TABLE, connect
from .errors import CaseIndexError
from .filters import INT64, Where, compile_filter
from .labels import ICDR, Scale
from .records import COLUMNS, Case, CaseRef, Change, Hit
from .vectors import Settings, Vectors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One committed state for readers: never changed once made (a newer one replaces it)."""

    generation: int
    info: dict[str, str]
    vectors: Vectors
    rebuilt: bool = False  # the vectors were rebuilt from SQLite, not read from their file

    @property
    def base(self) -> int:
        """The generation of its vector file."""
        return vector_base(self.info)


def vector_base(info: dict[str, str]) -> int:
    """The generation of the vector file an `info` table names; later changes are in the vector
    log (indexes from before the log: the current generation)."""
    return int(info.get("vectors_generation", info["generation"]))


def storable(key: int) -> bool:
    """Whether a key fits SQLite's integers (a key outside them names no case)."""
    return INT64[0] <= key <= INT64[1]


class Reader:
    """The records and vectors of one index directory, read-only; one Reader serves many threads."""

    read_only = True

    def __init__(self, path: Path, defaults: Settings | None = None) -> None:
        self.path = path
        self._db = path / DB_NAME
        self._local = threading.local()  # each thread's SQLite connection
        self._opened: list[sqlite3.Connection] = []
        self._swap = threading.Lock()  # one thread builds the next snapshot
        info = self._read_info(self._conn())
        if info.get("format") != FORMAT:
            self.close()
            raise CaseIndexError(f"{path}: index format {info.get('format')!r}, this version reads {FORMAT!r}")
        self._dim = int(info["dim"])
        self.settings = Settings.from_info(info, defaults)
        self._prepare()
        self._snap = self._load()

    def _prepare(self) -> None:
        """What a subclass does before the first snapshot is read."""

    @classmethod
    def open(cls, path: str | Path, defaults: Settings | None = None) -> "Reader":
        """An existing index; `defaults`: the settings of an index from before they were recorded."""
        path = Path(path)
        if not (path / DB_NAME).is_file():
            raise CaseIndexError(f"{path}: not a fundus-sdk index (no {DB_NAME})")
        try:
            return cls(path, defaults)
        except sqlite3.DatabaseError as exc:
            raise CaseIndexError(
                f"{path}: cannot read {DB_NAME} ({exc}); restore the index from a backup, or create it again from the photos"
            ) from exc

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self._db, self.read_only)
            self._opened.append(conn)
        return conn

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection this reader opened."""
        for conn in self._opened:
            conn.close()
        self._opened.clear()
        self._local = threading.local()

    # -- what the index is -----------------------------------------------------------------------

    @staticmethod
    def _read_info(conn: sqlite3.Connection) -> dict[str, str]:
        return dict(conn.execute("SELECT name, value FROM info").fetchall())

    @property
    def info(self) -> dict[str, str]:
        """The `info` table as of the current snapshot."""
        return dict(self._snap.info)

    @property
    def generation(self) -> int:
        """How many changes have been committed, as of the current snapshot."""
        return self._snap.generation

    @property
    def dim(self) -> int:
        """The dimension of the stored vectors."""
        return self._dim

    @property
    def scale(self) -> Scale:
        """The grades a case may carry (indexes from before scales were recorded: ICDR 0-4)."""
        return Scale.parse(self._snap.info.get("scale", ICDR.spec))

    @property
    def root(self) -> Path | None:
        """The folder stored paths are relative to (None: paths are stored absolute)."""
        return Path(self._snap.info["root"]) if self._snap.info.get("root") else None

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM cases").fetchone()[0]

    @property
    def last_key(self) -> int:
        """The highest key ever given (0: none); keys are never reused."""
        row = self._conn().execute("SELECT seq FROM sqlite_sequence WHERE name = 'cases'").fetchone()
        return int(row[0]) if row else 0

    def grade_counts(self) -> dict[int | None, int]:
        return dict(self._conn().execute("SELECT grade, COUNT(*) FROM cases GROUP BY grade").fetchall())

    # -- snapshots ---------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The latest committed state: the current snapshot, or a new one when another process
        committed since (built once, by one thread, while others keep searching the old one)."""
        row = self._conn().execute("SELECT value FROM info WHERE name = 'generation'").fetchone()
        if int(row[0]) == self._snap.generation:
            return self._snap
        with self._swap:
            if int(row[0]) > self._snap.generation:
                self._snap = self._advance(self._snap)
            return self._snap

    def refresh(self) -> bool:
        """See what other processes committed; returns whether anything had changed."""
        before = self._snap.generation
        return self.snapshot().generation != before

    @contextmanager
    def _read_transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One consistent view of SQLite for several reads (no commit lands in between)."""
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")

    def _logged(self, since: int) -> tuple[dict[str, str], int, np.ndarray, np.ndarray, np.ndarray]:
        """Read in one transaction: the info table, the case count, and the net effect of the changes
        logged after generation `since`: (info, count, added keys, their vectors, removed keys)."""
        conn = self._conn()
        with self._read_transaction(conn):
            info = self._read_info(conn)
            rows = conn.execute(f"SELECT key, added FROM {LOG_TABLE} WHERE generation > ? ORDER BY id", (since,)).fetchall() \
                if self._has_table(LOG_TABLE) else []  # fmt: skip
            added = {k for k, a in rows if a}
            removed = {k for k, a in rows if not a}  # keys are never reused: each is added and removed once at most
            keys, vecs = self.stored_vectors(sorted(added - removed))
            return info, len(self), keys, vecs, np.array(sorted(removed - added), dtype=np.uint64)

    def _advance(self, snap: Snapshot) -> Snapshot:
        """The snapshot after `snap`: the logged changes applied when the vector file is the same."""
        info, count, keys, vecs, removed = self._logged(since=snap.generation)
        if vector_base(info) == snap.base:
            vectors = vec.updated(snap.vectors, keys, vecs, removed)
            if len(vectors) == count:
                return Snapshot(int(info["generation"]), info, vectors)
        return self._load()

    def _vector_file(self, generation: int) -> Path:
        return self.path / f"vectors-{generation}.usearch"

    def _load(self) -> Snapshot:
        """The vectors to search: the base vector file plus the changes logged since; rebuilt from
        SQLite when the file is missing, damaged or disagrees with it. A writer in another process
        may rewrite the vector file meanwhile and remove the old one: then the newer one is read."""
        vectors = None
        for _ in range(20):
            base = vector_base(self._read_info(self._conn()))
            info, count, keys, vecs, removed = self._logged(since=base)
            if vector_base(info) != base:  # rewritten since `base` was read
                continue
            file = self._vector_file(base)
            try:
                if file.is_file():
                    vectors = vec.restore(file, info.get("vectors_sha256"), self.read_only, self.settings)
                elif base == 0:  # generation 0 has no file: a new index's vectors are all in the log
                    vectors = vec.empty(int(info["dim"]), info["dtype"], self.settings)
            except FileNotFoundError:  # removed while being read: a newer file is in place
                continue
            break
        if vectors is not None:
            vectors = vec.updated(vectors, keys, vecs, removed)
        if vectors is not None and len(vectors) == count:
            return Snapshot(int(info["generation"]), info, vectors)
        log.warning("%s: vector file missing, damaged or stale; rebuilding it from %s (%d cases)", self.path, DB_NAME, count)
        conn = self._conn()
        with self._read_transaction(conn):
            info = self._read_info(conn)
            return Snapshot(int(info["generation"]), info, self._vectors_from_sqlite(info), rebuilt=True)

    def _vectors_from_sqlite(self, info: dict[str, str]) -> vec.USearch:
        """A usearch index of every vector SQLite holds (the source of truth)."""
        vectors = vec.empty(int(info["dim"]), info["dtype"], self.settings)
        keys, vecs = self.stored_vectors()
        if len(keys):
            vectors.add(keys, vecs)
        return vectors

    # -- reading records ---------------------------------------------------------------------------

    def stored_vectors(self, keys: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(keys, vectors) SQLite holds, of every case or of `keys`; a damaged row is left out, with a warning."""
        conn = self._conn()
        if keys is None:
            rows = conn.execute("SELECT key, vector FROM cases ORDER BY key").fetchall()
        else:
            rows, keys = [], list(keys)
            for i in range(0, len(keys), 900):
                part = keys[i : i + 900]
                rows += conn.execute(f"SELECT key, vector FROM cases WHERE key IN ({','.join('?' * len(part))})", part).fetchall()
        sized = [r for r in rows if isinstance(r[1], bytes) and len(r[1]) == 4 * self.dim]
        ks = np.array([r[0] for r in sized], dtype=np.uint64)
        vs = np.frombuffer(b"".join(r[1] for r in sized), dtype=np.float32).reshape(len(sized), self.dim)
        whole = unit_rows(vs)
        if len(sized) < len(rows) or not whole.all():
            bad = sorted({r[0] for r in rows} - set(ks[whole].tolist()))
            warnings.warn(f"{self.path}: case(s) {', '.join(map(str, bad[:10]))} have a damaged stored vector and are left "
                          "out of search (remove and re-add them)", stacklevel=3)  # fmt: skip
            ks, vs = ks[whole], vs[whole]
        return ks, vs

    def damaged_rows(self) -> list[int]:
        """Keys whose stored vector is not `dim` float32 values, finite and of unit norm."""
        size = 4 * self.dim
        return [k for (k, v) in self._conn().execute("SELECT key, vector FROM cases")
                if not isinstance(v, bytes) or len(v) != size or not unit_rows(np.frombuffer(v, np.float32)[None])[0]]  # fmt: skip

    def stored_path(self, path: str | Path) -> str:
        """How a photo's path is stored: relative to `root` when inside it, else absolute."""
        real = Path(path).resolve()
        if self.root is not None and real.is_relative_to(self.root):
            return real.relative_to(self.root).as_posix()
        return str(real)

    def _public_path(self, stored: str | None) -> str | None:
        if stored is None or self.root is None or Path(stored).is_absolute():
            return stored
        return str(self.root / stored)

    def key_of(self, ref: CaseRef) -> int | None:
        """The key of a case named by key, sha256 or photo path (None when there is none)."""
        conn = self._conn()
        if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
            if not storable(int(ref)):
                return None
            row = conn.execute("SELECT key FROM cases WHERE key = ?", (int(ref),)).fetchone()
        elif isinstance(ref, str) and len(ref) == 64 and all(c in "0123456789abcdef" for c in ref):
            row = conn.execute("SELECT key FROM cases WHERE sha256 = ?", (ref,)).fetchone()
        elif isinstance(ref, (str, Path)):
            row = conn.execute("SELECT key FROM cases WHERE path = ?", (self.stored_path(ref),)).fetchone()
        else:
            raise TypeError(f"a case is named by its key, sha256 or path, got {type(ref).__name__}")
        return None if row is None else row[0]

    def _case(self, row: tuple, cls: type[Case] = Case, **extra: Any) -> Case:
        key, path, sha, grade, meta, added = row
        return cls(key, self._public_path(path), sha, grade, json.loads(meta), added, **extra)

    def get(self, ref: CaseRef) -> Case:
        """The case named by its key, sha256 or photo path; KeyError when there is none."""
        key = self.key_of(ref)
        row = None if key is None else self._conn().execute(f"{CASE_SELECT} WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(f"{self.path} has no case {ref!r}")
        return self._case(row)

    def find(self, sha256: str) -> Case | None:
        """The case holding the photo of this content, if any."""
        row = self._conn().execute(f"{CASE_SELECT} WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else self._case(row)

    def cases(self, where: Where | None = None, exclude: Where | None = None, after: int = 0,
              limit: int | None = None) -> list[Case]:  # fmt: skip
        """The cases matching a filter (see fundus_sdk.filters) with keys above `after`, by key, at most `limit`."""
        condition, params = compile_filter(where, exclude, self.fields()) if (where or exclude) else ("1", [])
        after, limit = min(max(after, INT64[0]), INT64[1]), -1 if limit is None else min(limit, INT64[1])  # SQLite's integers
        rows = self._conn().execute(f"{CASE_SELECT} WHERE {condition} AND key > ? ORDER BY key LIMIT ?", [*params, after, limit]).fetchall()
        return [self._case(r) for r in rows]

    def fields(self) -> list[str]:
        """The fields a filter may name: the columns and every metadata field some case has."""
        rows = self._conn().execute("SELECT DISTINCT j.key FROM cases, json_each(cases.meta) AS j").fetchall()
        return list(COLUMNS) + sorted(r[0] for r in rows if r[0] not in COLUMNS)

    def history(self, key: int | None = None) -> list[Change]:
        """Recorded changes of stored values, oldest first (of one key, or of all)."""
        if not self._has_table("changes") or (key is not None and not storable(key)):
            return []
        query = "SELECT key, at, field, old, new FROM changes" + (" WHERE key = ?" if key is not None else "") + " ORDER BY id"
        rows = self._conn().execute(query, () if key is None else (key,)).fetchall()
        return [Change(k, at, f, None if o is None else json.loads(o), None if n is None else json.loads(n))
                for k, at, f, o, n in rows]  # fmt: skip

    def _has_table(self, name: str) -> bool:
        return self._conn().execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    # -- searching ---------------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int, where: Where | None = None, exclude: Where | None = None,
               snap: Snapshot | None = None) -> list[list[Hit]]:  # fmt: skip
        """The k nearest cases to each row of `vectors` (unit rows; a NaN row gets no hits), best
        first, among those matching the filter, in the snapshot `snap` (default: the latest)."""
        snap = snap or self.snapshot()
        allowed = self._filter_keys(where, exclude) if (where or exclude) else None
        answered = np.flatnonzero(np.isfinite(vectors).all(axis=1))
        results: list[list[Hit]] = [[] for _ in vectors]
        if allowed is None and len(answered):  # one batched search (usearch runs it on every core)
            for i, (keys, sims) in zip(answered, self._nearest(snap, vectors[answered], k)):
                results[i] = self._hits(keys, sims)
        elif allowed is not None:
            for i in answered:
                results[i] = self._search_filtered(snap, vectors[i], k, allowed)
        return results

    def _filter_keys(self, where: Where | None, exclude: Where | None) -> np.ndarray:
        condition, params = compile_filter(where, exclude, self.fields())
        rows = self._conn().execute(f"SELECT key FROM cases WHERE {condition}", params).fetchall()
        return np.array([r[0] for r in rows], dtype=np.uint64)

    def _exact(self, snap: Snapshot) -> bool:
        return len(snap.vectors) <= self.settings.exact_below

    def _nearest(self, snap: Snapshot, vecs: np.ndarray, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, similarities) of the `count` nearest cases to each row of `vecs`, best first, by
        one search: exact up to `exact_below` cases, else through the HNSW graph."""
        total = len(snap.vectors)
        if total == 0 or count <= 0:
            return [(np.empty(0, np.uint64), np.empty(0, np.float32)) for _ in vecs]
        found = snap.vectors.search(vecs if len(vecs) > 1 else vecs[0], min(count, total), exact=self._exact(snap))
        if len(vecs) == 1:
            return [(found.keys, 1.0 - found.distances)]
        return [(found.keys[i, :c], 1.0 - found.distances[i, :c]) for i, c in enumerate(found.counts)]

    def _search_filtered(self, snap: Snapshot, query: np.ndarray, k: int, allowed: np.ndarray) -> list[Hit]:
        """The k nearest cases among the `allowed` keys."""
        total = len(snap.vectors)
        if total == 0 or k <= 0 or len(allowed) == 0:
            return []
        want = min(k, len(allowed))
        if len(allowed) > max(4096, total // 20):
            # a broad filter: oversample the approximate search until enough hits pass it
            allowed_set = set(allowed.tolist())
            count = min(total, want * 2 * -(-total // len(allowed)))
            while True:
                found = snap.vectors.search(query, count, exact=self._exact(snap))
                mask = np.fromiter((int(key) in allowed_set for key in found.keys), bool, len(found.keys))
                if mask.sum() >= want:
                    return self._hits(found.keys[mask][:want], (1.0 - found.distances)[mask][:want])
                if count >= total:
                    break
                count = min(total, count * 2)
        # a narrow filter (or an approximate search that fell short): exact search over the allowed
        keys, vs = self.stored_vectors(allowed.tolist())
        sims = vs @ query
        top = np.argsort(-sims)[:want]
        return self._hits(keys[top], sims[top])

    def _hits(self, keys: np.ndarray, scores: np.ndarray) -> list[Hit]:
        keys = [int(k) for k in keys]
        if not keys:
            return []
        rows = self._conn().execute(f"{CASE_SELECT} WHERE key IN ({','.join('?' * len(keys))})", keys).fetchall()
        by_key = {r[0]: r for r in rows}
        return [self._case(r, Hit, score=float(s)) for key, s in zip(keys, scores) if (r := by_key.get(key)) is not None]

    # -- consistency ---------------------------------------------------------------------------------

    def _vector_files(self) -> tuple[Path, list[Path]]:
        """The current vector file, and the files no reader needs: other generations' vector files,
        writers' temporary files."""
        current = self._vector_file(self._snap.base)
        return current, [p for p in self.path.iterdir()
                         if (p.name.startswith(".vectors-") and p.name.endswith(".tmp"))
                         or (p.name.startswith("vectors-") and p.suffix == ".usearch" and p != current)]  # fmt: skip

    def check(self) -> dict[str, Any]:
        """Consistency: rows, searchable vectors, the vector file's checksum, damaged rows and
        leftover files of interrupted writers."""
        snap = self.snapshot()
        file, leftovers = self._vector_files()
        logged = self._conn().execute(f"SELECT COUNT(*) FROM {LOG_TABLE}").fetchone()[0] if self._has_table(LOG_TABLE) else 0
        damaged, recorded = self.damaged_rows(), snap.info.get("vectors_sha256")
        report = {
            "path": str(self.path),
            "rows": len(self),
            "vectors": len(snap.vectors),
            "vector_file": file.name if file.is_file() else None,
            "logged_changes": logged,  # since the vector file was written; applied at opening
            "checksum": ("not written yet" if snap.base == 0 else "missing") if not file.is_file() else
                        ("not recorded" if recorded is None else ("ok" if vec.file_sha256(file) == recorded else "differs")),
            "damaged_rows": damaged,
            "leftover_files": sorted(p.name for p in leftovers),
        }  # fmt: skip
        report["ok"] = (  # leftovers are only garbage of a killed writer: reported, removed by the next write
            report["rows"] == report["vectors"] + len(damaged) and report["checksum"] in ("ok", "not recorded", "not written yet")
            and not damaged
        )  # fmt: skip
        return report
