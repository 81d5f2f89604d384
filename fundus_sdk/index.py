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

import json
import sqlite3
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from .atomic import write_atomically
from .errors import CaseIndexError, ModelMismatchError
from .inputs import ImageInput
from .labels import GRADE_RANGE, is_grade
from .model import Model, OnError, as_list, load_model  # imports onnxruntime before usearch, see below

# onnxruntime must be loaded before usearch's extension: the other order crashed with usearch 2.26.
from usearch.index import Index as _USearch  # noqa: E402

FORMAT = "1"
DB_NAME = "cases.sqlite"
COLUMNS = ("key", "path", "sha256", "grade", "added")
Where = dict[str, Union[Any, Sequence[Any]]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    key INTEGER PRIMARY KEY,
    path TEXT,
    sha256 TEXT UNIQUE,
    grade INTEGER,
    meta TEXT NOT NULL DEFAULT '{}',
    added TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS cases_grade ON cases(grade);
"""


@dataclass
class Hit:
    """One retrieved case: its key, cosine similarity to the query, and what the index knows of it."""

    key: int
    score: float
    path: str | None
    sha256: str | None
    grade: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    added: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "score": self.score,
            "path": self.path,
            "sha256": self.sha256,
            "grade": self.grade,
            "metadata": self.metadata,
            "added": self.added,
        }


class Index:
    """A persistent case index. Create with `Index.create`, open with `Index.open`.

    Indexes of up to `exact_below` cases are searched exactly (brute force takes about a
    millisecond there); larger ones use usearch's HNSW graph with a search depth of
    `expansion_search`, four times usearch's default of 64, because recall@10 at 64 was poor
    (0.59 against 0.94 at 256 on 6,000 random 256-d vectors). Speed and recall at 100k and
    more: benchmarks/RESULTS.md.
    """

    exact_below = 20_000
    expansion_search = 256

    def __init__(self, path: Path, conn: sqlite3.Connection, read_only: bool, model: Model | None) -> None:
        self.path = path
        self._conn = conn
        self.read_only = read_only
        self._model = model
        self._info = dict(conn.execute("SELECT name, value FROM info").fetchall())
        if self._info.get("format") != FORMAT:
            raise CaseIndexError(f"{path}: index format {self._info.get('format')!r}, this version reads {FORMAT!r}")
        if model is not None and model.fingerprint != self.model_fingerprint:
            raise ModelMismatchError(self._mismatch(model))
        self._vectors = self._load_vectors()

    # -- opening and creating -------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, model: Model | str | Path | None = None, dtype: str = "f16") -> "Index":
        """A new, empty index in directory `path` (which must not exist or must be empty).

        `model` is the model whose vectors it will hold (None: the bundled default); `dtype`
        is how usearch stores vectors ("f16" halves memory; measured recall in benchmarks/).
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CaseIndexError(f"{path}: already exists and is not an empty directory")
        m = model if isinstance(model, Model) else load_model(model)
        path.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path / DB_NAME, isolation_level=None, check_same_thread=False)
        conn.executescript(SCHEMA)
        info = {
            "format": FORMAT,
            "model_fingerprint": m.fingerprint,
            "model_name": m.name,
            "dim": str(m.dim),
            "dtype": dtype,
            "generation": "0",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO info VALUES (?, ?)", info.items())
        return cls(path, conn, read_only=False, model=m)

    @classmethod
    def open(cls, path: str | Path, read_only: bool = False, model: Model | str | Path | None = None) -> "Index":
        """Open an existing index. Read-only opening memory-maps the vectors (fast for big indexes).

        `model` is needed only to embed images, and only if the index was not built with the
        bundled default model; a model other than the index's raises ModelMismatchError.
        """
        path = Path(path)
        db = path / DB_NAME
        if not db.is_file():
            raise CaseIndexError(f"{path}: not a fundus-sdk index (no {DB_NAME})")
        try:
            if read_only:
                conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            conn.execute("SELECT 1 FROM info LIMIT 1")
        except sqlite3.DatabaseError as exc:
            raise CaseIndexError(f"{path}: cannot read {DB_NAME} ({exc})") from exc
        m = model if isinstance(model, Model) or model is None else load_model(model)
        return cls(path, conn, read_only=read_only, model=m)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties ------------------------------------------------------------------------

    @property
    def model_fingerprint(self) -> str:
        return self._info["model_fingerprint"]

    @property
    def dim(self) -> int:
        return int(self._info["dim"])

    @property
    def generation(self) -> int:
        return int(self._info["generation"])

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]

    @property
    def model(self) -> Model:
        """The model that embeds images for this index (the bundled default unless given)."""
        if self._model is None:
            default = load_model()
            if default.fingerprint != self.model_fingerprint:
                raise ModelMismatchError(self._mismatch(default) + "; open the index with model=<its model file>")
            self._model = default
        return self._model

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
            **{k: v for k, v in self._info.items()},
        }

    # -- the vector file ---------------------------------------------------------------------

    def _vector_file(self, generation: int) -> Path:
        return self.path / f"vectors-{generation}.usearch"

    def _new_usearch(self) -> _USearch:
        return _USearch(ndim=self.dim, metric="cos", dtype=self._info["dtype"], expansion_search=self.expansion_search)

    def _load_vectors(self) -> _USearch:
        """The generation's usearch index; rebuilt from SQLite when missing or inconsistent."""
        file = self._vector_file(self.generation)
        count = len(self)
        vectors = None
        if file.is_file():
            try:
                vectors = _USearch.restore(str(file), view=self.read_only)
                vectors.expansion_search = self.expansion_search
            except Exception:  # usearch raises plain RuntimeErrors for damaged files
                vectors = None
        if vectors is None or len(vectors) != count:
            vectors = self._new_usearch()
            keys, vecs = self._stored_vectors()
            if len(keys):
                vectors.add(keys, vecs)
            if not self.read_only:
                self._write_vectors(vectors, self.generation)
        if not self.read_only:
            for stale in self.path.glob("vectors-*"):
                if stale.name != file.name:
                    stale.unlink(missing_ok=True)
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
        ks = np.array([r[0] for r in rows], dtype=np.uint64)
        vs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
        return ks, vs

    def _write_vectors(self, vectors: _USearch, generation: int) -> None:
        """Write the usearch file for `generation` aside, fsync it, and rename it into place."""
        with write_atomically(self._vector_file(generation)) as tmp:
            vectors.save(str(tmp))

    def _commit(self, change) -> Any:
        """Run `change(cursor, vectors)` as one durable step: SQLite transaction + new vector file."""
        if self.read_only:
            raise CaseIndexError(f"{self.path}: opened read-only")
        old = self.generation
        new = old + 1
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = change(self._conn, self._vectors)
            self._conn.execute("UPDATE info SET value = ? WHERE name = 'generation'", (str(new),))
            self._write_vectors(self._vectors, new)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._vector_file(new).unlink(missing_ok=True)
            self._info["generation"] = str(old)
            self._vectors = self._load_vectors()
            raise
        self._info["generation"] = str(new)
        self._vector_file(old).unlink(missing_ok=True)
        return result

    # -- adding and removing -----------------------------------------------------------------

    def _vectors_given(self, items: object) -> np.ndarray | None:
        """The input as an (n, dim) float array if it is vectors rather than images."""
        if isinstance(items, np.ndarray) and items.dtype.kind == "f" and items.ndim in (1, 2):
            vecs = np.atleast_2d(items).astype(np.float32)
            if vecs.shape[1] != self.dim:
                raise ModelMismatchError(f"vectors have dimension {vecs.shape[1]}, {self.path} holds {self.dim}")
            norms = np.linalg.norm(vecs, axis=1)
            if not np.all(np.isfinite(vecs)) or np.any(np.abs(norms - 1) > 1e-3):
                raise ValueError("vectors must be finite and unit-norm (as embed() returns them)")
            return vecs
        return None

    def add(
        self,
        items: ImageInput | Sequence[ImageInput] | np.ndarray,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        model_fingerprint: str | None = None,
        on_error: OnError = "raise",
        batch_size: int = 16,
        commit_every: int | None = None,
        progress=None,
    ) -> list[int | None]:
        """Add images (or vectors from this index's model) with per-case metadata; return keys.

        Metadata dicts may hold "grade" (an integer of fundus_sdk.GRADES), "path" and "sha256"; every other key is kept as
        free-form JSON. A photo whose content hash is already in the index is not added again:
        its existing key is returned. Vectors must come with `model_fingerprint` (or their
        metadata's "sha256") checked: vectors from another model are refused. With
        on_error="skip", unreadable images are reported (warning, or the callable) and their key
        is None. The whole call is one atomic change unless `commit_every` is given, in which
        case every `commit_every` inputs are committed (an interruption keeps a clean prefix).
        `progress(n)` is called after each batch with the number of inputs handled.
        """
        vecs = self._vectors_given(items)
        if vecs is not None and model_fingerprint is not None and model_fingerprint != self.model_fingerprint:
            raise ModelMismatchError(
                f"these vectors come from model {model_fingerprint[:12]}; {self.path} holds vectors of "
                f"{self._info.get('model_name')} ({self.model_fingerprint[:12]})"
            )
        inputs = list(vecs) if vecs is not None else as_list(items)
        meta = list(metadata) if metadata is not None else [None] * len(inputs)
        if len(meta) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(meta)} metadata entries")
        keys: list[int | None] = [None] * len(inputs)
        step = commit_every or max(1, len(inputs))
        for start in range(0, len(inputs), step):
            rows = self._rows(inputs[start : start + step], meta[start : start + step], vecs is not None, on_error, batch_size, progress)
            added = self._commit(lambda cur, vectors, rows=rows: self._insert(cur, vectors, rows))
            for pos, key in added:
                keys[start + pos] = key
        return keys

    def _rows(self, inputs, meta, are_vectors, on_error, batch_size, progress) -> list[tuple]:
        """(position, path, sha256, grade, meta json, vector) for every input that embeds."""
        rows = []

        def row(pos: int, vector: np.ndarray, digest: str | None) -> tuple:
            extra = dict(meta[pos] or {})
            grade = extra.pop("grade", None)
            if grade is not None and not is_grade(grade):
                raise ValueError(f"grade must be an integer {GRADE_RANGE}, got {grade!r}")
            item = inputs[pos]
            path = extra.pop("path", str(item) if isinstance(item, (str, Path)) else None)
            sha = extra.pop("sha256", None) or digest
            return (pos, path, sha, None if grade is None else int(grade), json.dumps(extra, default=str), vector)

        if are_vectors:
            return [row(i, v, None) for i, v in enumerate(inputs)]
        pending_errors = []
        for positions, vectors, digests, errors in self.model.iter_embed(inputs, batch_size=batch_size):
            if errors and on_error == "raise":
                raise errors[0]
            pending_errors += errors
            rows += [row(p, v, d) for p, v, d in zip(positions, vectors, digests)]
            if progress is not None:
                progress(len(positions) + len(errors))
        for err in pending_errors:
            if callable(on_error):
                on_error(err)
            else:
                warnings.warn(f"skipped {err}", stacklevel=3)
        return rows

    def _insert(self, cur: sqlite3.Connection, vectors: _USearch, rows: list[tuple]) -> list[tuple[int, int]]:
        added, new_keys, new_vecs = [], [], []
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for pos, path, sha, grade, meta_json, vec in rows:
            existing = cur.execute("SELECT key FROM cases WHERE sha256 = ?", (sha,)).fetchone() if sha else None
            if existing:
                added.append((pos, existing[0]))
                continue
            key = cur.execute(
                "INSERT INTO cases (path, sha256, grade, meta, added, vector) VALUES (?, ?, ?, ?, ?, ?)",
                (path, sha, grade, meta_json, now, np.asarray(vec, dtype=np.float32).tobytes()),
            ).lastrowid
            added.append((pos, key))
            new_keys.append(key)
            new_vecs.append(vec)
        if new_keys:
            vectors.add(np.array(new_keys, dtype=np.uint64), np.stack(new_vecs).astype(np.float32))
        return added

    def remove(self, keys: Sequence[int]) -> int:
        """Remove cases by key; returns how many were there."""
        keys = [int(k) for k in keys]

        def change(cur: sqlite3.Connection, vectors: _USearch) -> int:
            present = [k for k in keys if cur.execute("SELECT 1 FROM cases WHERE key = ?", (k,)).fetchone()]
            cur.executemany("DELETE FROM cases WHERE key = ?", [(k,) for k in present])
            if present:
                vectors.remove(np.array(present, dtype=np.uint64))
            return len(present)

        return self._commit(change)

    # -- searching -----------------------------------------------------------------------------

    def search(
        self, query: ImageInput | Sequence[ImageInput] | np.ndarray, k: int = 10, where: Where | None = None
    ) -> list[Hit] | list[list[Hit]]:
        """The k most similar cases (cosine similarity) for one query, or a list per query.

        `query` is an image (path, PIL image, HxWx3 array), a list of images, or unit vectors
        from this index's model (1-D: one query; 2-D: several). `where` keeps only cases whose
        fields equal the given values (a list means any of them), e.g. {"grade": [2, 3]} or
        {"eye": "left"}; k hits are still returned when k such cases exist.
        """
        vecs = self._vectors_given(query)
        if vecs is not None:
            single = np.asarray(query).ndim == 1
        else:
            single = not isinstance(query, (list, tuple)) and not (isinstance(query, np.ndarray) and query.ndim == 4)
            vecs = self.model.embed(query)
        allowed = self._filter_keys(where) if where else None
        results = [self._search_one(v, k, allowed) for v in vecs]
        return results[0] if single else results

    def _filter_keys(self, where: Where) -> np.ndarray:
        clauses, params = [], []
        for name, value in where.items():
            column = name if name in COLUMNS else "json_extract(meta, ?)"
            if name not in COLUMNS:
                params.append(f'$."{name}"')
            values = list(value) if isinstance(value, (list, tuple, set)) else [value]
            clauses.append(f"{column} IN ({','.join('?' * len(values))})")
            params += values
        rows = self._conn.execute(f"SELECT key FROM cases WHERE {' AND '.join(clauses)}", params).fetchall()
        return np.array([r[0] for r in rows], dtype=np.uint64)

    def _search_one(self, vec: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Hit]:
        total = len(self._vectors)
        if total == 0 or k <= 0:
            return []
        exact = total <= self.exact_below
        if allowed is None:
            found = self._vectors.search(vec, min(k, total), exact=exact)
            return self._hits(found.keys, 1.0 - found.distances)
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
            Hit(key, float(s), r[1], r[2], r[3], json.loads(r[4]), r[5])
            for key, s in zip(keys, scores)
            if (r := by_key.get(key)) is not None
        ]


def search(
    query: ImageInput | Sequence[ImageInput] | np.ndarray,
    index: Index | str | Path,
    k: int = 10,
    where: Where | None = None,
) -> list[Hit] | list[list[Hit]]:
    """Nearest cases for one query (a list of Hits) or several (a list of lists); see Index.search."""
    if isinstance(index, Index):
        return index.search(query, k=k, where=where)
    with Index.open(index, read_only=True) as ix:
        return ix.search(query, k=k, where=where)
