"""A case index: graded past cases to search by photograph.

`Index` joins a store of vectors and records (fundus_sdk.store; its reading half,
fundus_sdk.reader, is what threads share) with the model that embeds photos for it, and
passes photos both ways through the one pipeline (fundus_sdk.pipeline). Open an index
read-only to serve searches from many threads; another process may add cases meanwhile, and
each search sees the latest committed state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .dicom import identifying
from .embeddings import Embeddings
from .errors import CaseIndexError, ModelMismatchError, OnError
from .filters import Where
from .inputs import ImageInput
from .labels import Scale
from .model import Model, Providers, as_list, load_model
from .pipeline import Ingest, QueryResult, answer, unit_vectors, warn_ungradable
from .pseudonym import PSEUDONYM_KEY, Pseudonyms
from .reader import Reader
from .rebuild import RebuildReport, photo_of, rebuild, spec_of
from .records import RESERVED, BatchHits, Case, CaseRef, Change, Conflict, Hit, check_metadata, write_cases
from .store import DB_NAME, Store
from .vectors import Settings

__all__ = ["Index", "search", "query", "rebuild", "RebuildReport", "photo_of", "Case", "Hit", "BatchHits", "Change",
           "Conflict", "QueryResult", "Settings", "RESERVED", "check_metadata"]  # fmt: skip


def legacy_settings(cls: type) -> Settings:
    """Settings() unless the deprecated class attributes of Index were changed (said with a warning)."""
    changed = {f.name: getattr(cls, f.name) for f in fields(Settings) if getattr(cls, f.name) != getattr(Settings, f.name)}
    if changed:
        warnings.warn(f"setting Index.{', Index.'.join(changed)} is deprecated: pass settings=Settings(...) to Index.create",
                      DeprecationWarning, stacklevel=4)  # fmt: skip
    return replace(Settings(), **changed)


class Index:
    """A persistent case index. Create with `Index.create`, open with `Index.open`.

    How it searches and commits (HNSW settings, exact search below a size, the writer's wait,
    the vector log) is a `Settings` value recorded when the index is created (`settings=`).
    """

    # Deprecated: set `Index.create(..., settings=Settings(...))` instead. Changing these still
    # changes what new indexes record (and the settings of indexes from before they were recorded).
    exact_below = Settings.exact_below
    connectivity = Settings.connectivity
    expansion_add = Settings.expansion_add
    expansion_search = Settings.expansion_search
    lock_timeout = Settings.lock_timeout
    log_limit = Settings.log_limit

    def __init__(self, store: Reader, model: Model | None, runtime: tuple[Providers, int | None] = (None, None)) -> None:
        self._store = store
        self._model = model
        self._runtime = runtime  # how the default model runs when loaded
        self._pseudonyms = Pseudonyms(store) if isinstance(store, Store) else None
        if model is not None and not self._built_with(model):
            store.close()
            raise ModelMismatchError(self._mismatch(model))

    # -- opening and creating ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        model: Model | str | Path | None = None,
        dtype: str = "f16",
        root: str | Path | None = None,
        providers: Providers = None,
        threads: int | None = None,
        settings: Settings | None = None,
    ) -> "Index":
        """A new, empty index in directory `path` (which must not exist or must be empty).

        `model` is the model whose vectors it will hold (None: the bundled default); `dtype`
        is how usearch stores vectors ("f16" halves memory; measured recall in benchmarks/).
        Photos' paths are stored absolute, or, with `root`, relative to that folder (recorded
        in the index) when they lie inside it, so an archive can move as a whole. `providers`
        and `threads` say how the model runs (see `Model.load`); `settings` how it searches.
        """
        m = model if isinstance(model, Model) else load_model(model, providers, threads)
        Store.create(path, spec_of(m), dtype, root, settings or legacy_settings(cls)).close()
        return cls.open(path, model=m)

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
        """Open an existing index. Read-only opening memory-maps the vectors (fast for big indexes)
        and is what threads share.

        `model` is needed only to embed images, and only if the index was not built with the
        bundled default model; a model other than the index's raises ModelMismatchError.
        `providers` and `threads` say how the model runs (see `Model.load`).
        """
        m = model if isinstance(model, Model) or model is None else load_model(model, providers, threads)
        store = (Reader if read_only else Store).open(path, defaults=legacy_settings(cls))
        return cls(store, m, (providers, threads))

    def close(self) -> None:
        """Close the index (its database connections); `with Index.open(...)` does it for you."""
        self._store.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"<Index {str(self.path)!r}: {len(self)} cases, {self._store.info.get('model_name')}, {mode}>"

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it is --------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The index's directory."""
        return self._store.path

    @property
    def read_only(self) -> bool:
        """Whether this Index was opened read-only (it then searches, from any number of threads)."""
        return self._store.read_only

    @property
    def settings(self) -> Settings:
        """How this index searches and commits, as recorded at its creation."""
        return self._store.settings

    @property
    def model_fingerprint(self) -> str:
        """Fingerprint of the model whose vectors the index holds."""
        return self._store.info["model_fingerprint"]

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors."""
        return self._store.dim

    @property
    def scale(self) -> Scale:
        """The grading scale of the index's model: the grades a case may carry."""
        return self._store.scale

    @property
    def generation(self) -> int:
        """How many changes have been committed (as of the last search, write or refresh)."""
        return self._store.generation

    @property
    def root(self) -> Path | None:
        """The folder stored paths are relative to (None: paths are stored absolute)."""
        return self._store.root

    def __len__(self) -> int:
        return len(self._store)

    @property
    def last_key(self) -> int:
        """The highest key ever given (0: none). Keys are never reused, so cases added later have higher ones."""
        return self._store.last_key

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
        if "model_weights" not in self._store.info:
            return model.weights_fingerprint == self.model_fingerprint
        return model.fingerprint == self.model_fingerprint

    def _mismatch(self, model: Model) -> str:
        return (
            f"{self.path} was built with model {self._store.info.get('model_name')} "
            f"(fingerprint {self.model_fingerprint[:12]}), not {model.name} ({model.fingerprint[:12]})"
        )

    def grades(self) -> np.ndarray:
        """The grades of all graded cases (the gallery's class distribution)."""
        return np.array([g for g, n in self._store.grade_counts().items() if g is not None for _ in range(n)], dtype=int)

    def info(self) -> dict[str, Any]:
        """What the index is: size, model, dimension, storage, grade counts."""
        grades = self._store.grade_counts()
        return {
            "path": str(self.path),
            "cases": len(self),
            "grades": {("none" if g is None else str(g)): n for g, n in sorted(grades.items(), key=lambda x: (x[0] is None, x[0]))},
            **{k: v for k, v in self._store.info.items() if k != PSEUDONYM_KEY},  # the secret stays inside
        }

    def refresh(self) -> bool:
        """See what other processes committed since this index was opened or last refreshed.

        Searches and writes do this themselves; returns whether anything had changed.
        """
        return self._store.refresh()

    # -- reading cases -----------------------------------------------------------------------------

    def holds(self, ref: CaseRef) -> bool:
        """Whether a case named by key, sha256 or photo path is in the index."""
        return self._store.key_of(ref) is not None

    def get(self, ref: CaseRef) -> Case:
        """The case named by its key, sha256 or photo path; KeyError when the index has none."""
        return self._store.get(ref)

    def __iter__(self) -> Iterator[Case]:
        """Every case, by key (without vectors)."""
        return iter(self._store.cases())

    def cases(self, where: Where | None = None, exclude: Where | None = None, *, after: int = 0,
              limit: int | None = None) -> list[Case]:  # fmt: skip
        """The cases matching a filter (see fundus_sdk.filters), by key; `after` and `limit` page
        through them (the keys of a page are above the last key of the one before)."""
        return self._store.cases(where, exclude, after, limit)

    def fields(self) -> list[str]:
        """The fields a filter may name: the columns and every metadata field some case has."""
        return self._store.fields()

    def history(self, ref: CaseRef | None = None) -> list[Change]:
        """Recorded changes of stored values, oldest first (of one case, or of all); a removed
        case's history by its key. KeyError for a case that never was."""
        if ref is None:
            return self._store.history()
        key = self._store.key_of(ref)
        if key is not None:
            return self._store.history(key)
        removed = self._store.history(int(ref)) if isinstance(ref, (int, np.integer)) else []  # a removed case's, by key
        if not removed:
            raise KeyError(f"{self.path} has no case {ref!r}")
        return removed

    def export(self, out: str | Path, fmt: str | None = None) -> int:
        """Write every case (all but the vectors) as CSV or JSON Lines (by `fmt` or the suffix) to
        `out` ("-": standard output; see fundus_sdk.atomic.write_output); returns how many. CSV
        columns: key, path, sha256, grade, added, then the metadata fields; text a spreadsheet
        would run as a formula is written inert (fundus_sdk.records.inert)."""
        return write_cases(out, self._store.cases(), self._store.fields(), fmt)

    def check(self, repair: bool = False) -> dict[str, Any]:
        """Consistency of the index: rows, searchable vectors, the vector file's checksum, damaged
        rows and leftover files. With `repair` (read-write), the vector file is rewritten from
        SQLite and leftovers of interrupted writers are removed."""
        report = self._store.check()
        if repair and self._writable().repair():
            report["repaired"] = True
        return report

    # -- adding, correcting and removing -----------------------------------------------------------

    def _writable(self) -> Store:
        if not isinstance(self._store, Store):
            raise CaseIndexError(f"{self.path}: opened read-only")
        return self._store

    def add(
        self,
        items: ImageInput | Sequence[ImageInput] | np.ndarray | Embeddings,
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
        gradability is stored); an `Embeddings` (fundus_sdk.read_embeddings) brings all of these,
        and with `check` its photos the gate refused are refused here too.
        With on_error="skip" (or a callable), unreadable images are reported and their key is
        None. The whole call is one atomic change unless `commit_every` (inputs) or
        `commit_seconds` is given: then each step is committed, and an interruption keeps every
        finished step. `progress(n)` after each batch, n inputs handled.
        With `check` (the default) each image passes the model's input gate: one that is not a
        colour fundus photograph is a NotFundusError (an ImageError, handled by `on_error`), and
        the gate's gradability score is stored as the case's "gradability" field.
        DICOM inputs add their header's fields (eye, UIDs, acquisition date, manufacturer, model,
        frame; fundus_sdk.dicom) under the caller's metadata, and a keyed pseudonym of the
        PatientID as "patient_pseudonym" (the same patient, the same pseudonym, in this index
        only); names, IDs, dates of birth and other identifiers are stored only with
        `keep_identifiers`.
        """
        store = self._writable()
        data = items if isinstance(items, Embeddings) else None
        if data is not None:
            items, model_fingerprint = data.vectors, data.model_fingerprint
        vecs = unit_vectors(items, self.dim)
        if vecs is not None and model_fingerprint is not None and model_fingerprint not in (
            self.model_fingerprint, store.info.get("model_weights")
        ):
            raise ModelMismatchError(
                f"these vectors come from model {model_fingerprint[:12]}; {self.path} holds vectors of "
                f"{store.info.get('model_name')} ({self.model_fingerprint[:12]})"
            )
        inputs = vecs if vecs is not None else as_list(items)
        ingest = Ingest(store, self._pseudonyms, len(inputs), metadata, on_error, on_conflict, commit_every, commit_seconds)
        if data is not None:
            return ingest.embeddings(data, check)
        if vecs is not None:
            return ingest.vectors(vecs, paths, hashes, verdicts)
        return ingest.images(self.model, inputs, batch_size, check, keep_identifiers, progress)

    def update(self, ref: CaseRef, values: dict[str, Any]) -> Case:
        """Set metadata fields of one case (named by key, sha256 or path); None removes a field.

        Every change is recorded with its time, old and new value (see `history`).
        """
        store = self._writable()
        key = store.key_of(ref)
        if key is None:
            raise KeyError(f"{self.path} has no case {ref!r}")
        grade, extra = check_metadata({k: v for k, v in values.items() if v is not None}, self.scale)
        removed = [k for k, v in values.items() if v is None]
        if "grade" in removed:
            raise ValueError("a case's grade can be corrected, not removed")
        store.update(key, grade, extra, removed)
        return self.get(key)

    def remove(self, refs: Sequence[CaseRef]) -> int:
        """Remove cases named by key, sha256 or path; returns how many were there. Each removal is
        recorded in the history (field "case": its sha256 and grade), and the patient identifiers
        the case held (`keep_identifiers`) are purged from the history with it."""
        store = self._writable()
        keys = sorted({k for k in (store.key_of(r) for r in refs) if k is not None})
        return store.remove(keys, purge=identifying)

    # -- searching -----------------------------------------------------------------------------------

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
        vecs = unit_vectors(query, self.dim)
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
        vecs = unit_vectors(queries, self.dim)
        if vecs is not None:
            return BatchHits(self._store.search(vecs, k, where, exclude))
        results = self.query(as_list(queries), k, where, exclude, check, on_error)
        warn_ungradable(results)
        return BatchHits([r.hits for r in results])

    def query(self, images: Sequence[ImageInput], k: int = 10, where: Where | None = None, exclude: Where | None = None,
              check: bool = True, on_error: OnError = "raise") -> list[QueryResult]:  # fmt: skip
        """Each image's answer with its gate verdict: see `fundus_sdk.query`."""
        return answer(self.model, self._store, images, k, where, exclude, check, on_error)


def query(
    images: ImageInput | Sequence[ImageInput],
    index: Index | str | Path,
    k: int = 10,
    where: Where | None = None,
    exclude: Where | None = None,
    on_error: OnError = "raise",
    check: bool = True,
) -> list[QueryResult]:
    """Search an index (or its directory) for each image; one QueryResult per image, in order:
    its name, the input gate's verdict, its hits (best first) and, for a query that could not be
    answered (unreadable, or not a fundus photograph), its error. Errors also go to `on_error`:
    "raise" (the default) raises the first, "skip" warns, a callable receives each. Every query
    of one call is searched in the same committed state of the index (`QueryResult.generation`)."""
    with searched(index) as ix:
        return ix.query(as_list(images), k, where, exclude, check, on_error)


def search(
    query: ImageInput | Sequence[ImageInput] | np.ndarray,
    index: Index | str | Path,
    k: int = 10,
    where: Where | None = None,
    exclude: Where | None = None,
    check: bool = True,
) -> list[Hit]:
    """The nearest cases for one query, best first (an index or its directory); see Index.search."""
    with searched(index) as ix:
        return ix.search(query, k=k, where=where, exclude=exclude, check=check)


@contextmanager
def searched(index: Index | str | Path) -> Iterator[Index]:
    """The index given, or the one in that directory opened read-only for the call (and closed after)."""
    if isinstance(index, Index):
        yield index
        return
    with Index.open(index, read_only=True) as ix:
        yield ix
