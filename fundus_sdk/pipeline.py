"""The two directions photos travel, in one place for the library, the command line, the report,
the Ray path and services: into an index (`Ingest`) and as queries (`answer`).

Both pass each photo through the model's input gate by the one rule (`gate.refusal`), name each
photo that fails with its reason, and hand the failure to the caller's `on_error`.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contract import unit_rows
from .dicom import Frame
from .embeddings import Embeddings
from .errors import ImageError, ModelMismatchError, OnError, error_policy
from .filters import Where
from .gate import UngradableWarning, Verdict, refusal
from .inputs import ImageInput, describe, identify
from .labels import Scale, match_labels, read_labels
from .model import Model
from .pseudonym import Pseudonyms
from .reader import Reader
from .records import ON_CONFLICT, RESERVED, Conflict, Hit, check_metadata
from .store import Store

log = logging.getLogger(__name__)


@dataclass
class QueryResult:
    """One query's answer: its name, the gate's verdict, its hits (best first) and the error that
    kept it from being answered (unreadable, or not a fundus photograph), in the index's
    `generation` it was searched in."""

    query: str
    hits: list[Hit]
    verdict: Verdict | None = None
    error: ImageError | None = None
    generation: int = 0

    @property
    def ok(self) -> bool:
        """Whether the query was answered."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready values."""
        return {
            "query": self.query, "verdict": self.verdict.to_dict() if self.verdict else None,
            "hits": [h.to_dict() for h in self.hits], "error": None if self.error is None else self.error.reason,
            "generation": self.generation,
        }  # fmt: skip


def answer(model: Model, reader: Reader, queries: Sequence[ImageInput], k: int = 10, where: Where | None = None,
           exclude: Where | None = None, check: bool = True, on_error: OnError = "raise") -> list[QueryResult]:  # fmt: skip
    """Embed each query (through the gate with `check`), then search them all in one snapshot of
    the index. A query that fails is handed to `on_error` ("raise", "skip" or a callable) and
    keeps its error in its result."""
    failed = error_policy(on_error)
    results = [QueryResult(describe(q), []) for q in queries]
    vecs = np.full((len(queries), reader.dim), np.nan, np.float32)
    for batch in model.iter_embed(queries, check=check):
        for i, err in zip(batch.failed, batch.errors):
            results[i].error = err
            failed(err)
        for i, vec, verdict in zip(batch.positions, batch.vectors, batch.verdicts):
            results[i].verdict = verdict
            if (refused := refusal(queries[i], verdict)) is not None:
                results[i].error = refused
                failed(refused)
            else:
                vecs[i] = vec
    snap = reader.snapshot()
    for result, hits in zip(results, reader.search(vecs, k, where, exclude, snap)):
        result.hits, result.generation = hits, snap.generation
    return results


def warn_ungradable(results: Sequence[QueryResult]) -> None:
    """An UngradableWarning for each answered query the gate judged ungradable."""
    for r in results:
        if r.ok and r.verdict is not None and not r.verdict.gradable:
            warnings.warn(f"{r.query}: {r.verdict.summary()}", UngradableWarning, stacklevel=3)


def unit_vectors(items: object, dim: int) -> np.ndarray | None:
    """The input as an (n, dim) float array if it is vectors rather than images; ValueError for
    vectors that are not finite and unit-norm, ModelMismatchError for another dimension."""
    if isinstance(items, np.ndarray) and items.dtype.kind == "f" and items.ndim in (1, 2):
        vecs = np.atleast_2d(items).astype(np.float32)
        if vecs.shape[1] != dim:
            raise ModelMismatchError(f"vectors have dimension {vecs.shape[1]}, the index holds {dim}")
        if not unit_rows(vecs).all():
            raise ValueError("vectors must be finite and unit-norm (as embed() returns them)")
        return vecs
    return None


def embed_files(model: Model, files: Sequence[ImageInput], *, batch_size: int = 16, check: bool = True,
                on_error: OnError = "raise", progress: Callable[[int], None] | None = None) -> Embeddings:  # fmt: skip
    """An embedding file's content for `files`: a vector, absolute path, sha256 and verdict for
    each photo the gate accepts; the others go to `on_error`."""
    failed = error_policy(on_error)
    vectors, names, hashes, verdicts = [], [], [], []
    for batch in model.iter_embed(files, batch_size=batch_size, check=check):
        for err in batch.errors:
            failed(err)
        for pos, vec, sha, verdict in zip(batch.positions, batch.vectors, batch.sha256, batch.verdicts):
            if (refused := refusal(files[pos], verdict)) is not None:
                failed(refused)
                continue
            vectors.append(vec)
            names.append(absolute(files[pos]))  # opens from any directory
            hashes.append(sha)
            verdicts.append(verdict.to_dict() if verdict else None)
        if progress is not None:
            progress(len(batch.positions) + len(batch.errors))
    matrix = np.stack(vectors) if vectors else np.zeros((0, model.dim), np.float32)
    checked = verdicts if any(v is not None for v in verdicts) else None
    return Embeddings(matrix, names, hashes, model.fingerprint, model.name, checked)


def absolute(item: ImageInput) -> str:
    """A file input's absolute path (a DICOM frame: with its frame number)."""
    return str(Frame(item.path.resolve(), item.index, item.count) if isinstance(item, Frame) else Path(item).resolve())


class Ingest:
    """One call's way into a store: metadata checked, photos identified before decoding (a photo
    the store holds is not embedded again; other metadata is a Conflict), embedded, gated,
    and committed in steps. See `fundus_sdk.Index.add`, whose arguments these are."""

    def __init__(self, store: Store, pseudonyms: Pseudonyms, n: int, metadata: Sequence[dict | None] | None,
                 on_error: OnError, on_conflict: str | Callable[[Conflict], None], commit_every: int | None,
                 commit_seconds: float | None) -> None:  # fmt: skip
        if on_conflict not in ON_CONFLICT and not callable(on_conflict):
            raise ValueError(f"on_conflict must be one of {ON_CONFLICT} or a callable, got {on_conflict!r}")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"{n} inputs but {len(metadata)} metadata")
        self.store, self.pseudonyms, self.on_conflict = store, pseudonyms, on_conflict
        self.failed = error_policy(on_error, stacklevel=4)
        self.meta = [check_metadata(m, store.scale) for m in (metadata if metadata is not None else [None] * n)]
        self.keys: list[int | None] = [None] * n
        self.pending: list[tuple] = []  # rows to insert: (position, path, sha256, grade, meta json, vector)
        self.commit_every, self.commit_seconds, self.last_commit = commit_every, commit_seconds, time.monotonic()

    def commit(self) -> None:
        """Store the pending rows as one change."""
        if self.pending:
            rows, self.pending = self.pending, []
            for pos, key in self.store.insert(rows):
                self.keys[pos] = key
        self.last_commit = time.monotonic()

    def queue(self, pos: int, path: str | None, sha: str | None, extra: dict[str, Any], vec: np.ndarray) -> None:
        """A new case for input `pos`, committed with the next step."""
        self.pending.append((pos, path, sha, self.meta[pos][0], json.dumps(extra, default=str), vec))

    def step(self) -> None:
        """Commit the pending cases if a step is due (`commit_every` of them, or `commit_seconds` passed)."""
        if (self.commit_every and len(self.pending) >= self.commit_every) or (
            self.commit_seconds is not None and time.monotonic() - self.last_commit >= self.commit_seconds
        ):
            self.commit()

    def held(self, sha: str, pos: int) -> bool:
        """Whether the store holds this photo already; if so, its key is recorded and conflicts settled."""
        case = self.store.find(sha)
        if case is None:
            return False
        self.keys[pos] = case.key
        grade, extra = self.meta[pos]
        stored = case.metadata | {"grade": case.grade}
        given = extra | ({"grade": grade} if grade is not None else {})
        conflicts = [Conflict(case.key, case.path, name, stored.get(name), value)
                     for name, value in given.items() if stored.get(name) != value]  # fmt: skip
        if not conflicts:
            return True
        if self.on_conflict == "update":
            new = {c.field: c.given for c in conflicts}
            new_grade, new_extra = check_metadata(new, self.store.scale)
            self.store.update(case.key, new_grade, new_extra, [])
        elif callable(self.on_conflict):
            for c in conflicts:
                self.on_conflict(c)
        else:
            warnings.warn("kept the stored values (on_conflict='update' stores the new ones): " + "; ".join(map(str, conflicts)),
                          stacklevel=4)  # fmt: skip
        return True

    def embeddings(self, data: Embeddings, check: bool) -> list[int | None]:
        """Add an embedding file's vectors: its failed photos named, its DICOM headers kept under
        the caller's metadata, and with `check` the photos its gate verdicts refuse left out."""
        for path, reason in data.failed:  # rows of `embed --ray` without a vector
            self.failed(ImageError(path, reason))
        if data.metadata is not None:
            self.meta = [(grade, {**header, **extra}) for (grade, extra), header in zip(self.meta, data.metadata)]
        refused = set()
        for pos, verdict in enumerate(data.verdicts if check and data.verdicts is not None else []):
            if verdict is not None and (error := refusal(data.paths[pos], Verdict.from_dict(verdict))) is not None:
                refused.add(pos)
                self.failed(error)
        return self.vectors(data.vectors, data.paths, [s or None for s in data.sha256], data.verdicts, refused)

    def vectors(self, vecs: np.ndarray, paths: Sequence[str | None] | None, hashes: Sequence[str | None] | None,
                verdicts: Sequence[dict[str, Any] | None] | None, skip: set[int] = frozenset()) -> list[int | None]:  # fmt: skip
        """Add vectors of the store's model (with the photos' paths, hashes and the gate's verdicts),
        but those at the positions in `skip`."""
        for name, given in (("paths", paths), ("hashes", hashes), ("verdicts", verdicts)):
            if given is not None and len(given) != len(vecs):
                raise ValueError(f"{len(vecs)} inputs but {len(given)} {name}")
        for pos, vec in enumerate(vecs):
            sha = hashes[pos] if hashes is not None else None
            if pos in skip or (sha and self.held(sha, pos)):
                continue
            extra = self.meta[pos][1]
            if verdicts is not None and verdicts[pos]:
                extra = {**extra, "gradability": verdicts[pos]["gradability"]}
            self.queue(pos, paths[pos] if paths is not None else None, sha, extra, vec)
            self.step()
        self.commit()
        return self.keys

    def images(self, model: Model, inputs: Sequence[ImageInput], batch_size: int, check: bool, keep_identifiers: bool,
               progress: Callable[[int], None] | None) -> list[int | None]:  # fmt: skip
        """Add photos: identified first, embedded only when the store does not hold them yet."""
        first: dict[str, int] = {}  # sha256 -> position of its first occurrence in this call
        copies: list[tuple[int, str]] = []  # later occurrences of a photo in this call
        todo, todo_pos, todo_sha = [], [], []
        for pos, item in enumerate(inputs):
            try:
                sha, decodable = identify(item)
            except ImageError as err:
                self.failed(err)
                continue
            if sha in first:  # the same photo twice in this call: one case
                copies.append((pos, sha))
            elif self.held(sha, pos):
                if progress is not None:
                    progress(1)
            else:
                first[sha] = pos
                todo.append(decodable)
                todo_pos.append(pos)
                todo_sha.append(sha)
        for batch in model.iter_embed(todo, batch_size=batch_size, check=check):
            for err in batch.errors:
                self.failed(err)  # raises under on_error="raise", before this step is committed
            for i, vec, sha, verdict, found, who in zip(
                batch.positions, batch.vectors, batch.sha256, batch.verdicts, batch.metadata, batch.identifiers
            ):
                pos, item = todo_pos[i], inputs[todo_pos[i]]
                if sha != todo_sha[i]:  # the bytes decoded are not those identified: never store one under the other
                    self.failed(ImageError(describe(item), "the file changed while it was being added; add it again"))
                elif (refused := refusal(item, verdict)) is not None:
                    self.failed(refused)
                else:
                    extra = {**found, **self.pseudonyms.of(who, keep_identifiers), **self.meta[pos][1]}
                    if verdict is not None:
                        extra["gradability"] = verdict.gradability
                    source = item.path if isinstance(item, Frame) else item  # a DICOM frame: its file
                    path = self.store.stored_path(source) if isinstance(source, (str, Path)) else None
                    self.queue(pos, path, sha, extra, vec)
            if progress is not None:
                progress(len(batch.positions) + len(batch.errors))
            self.step()
        self.commit()
        for pos, sha in copies:
            self.keys[pos] = self.keys[first[sha]]
        log.info("%s: %d of %d inputs added or already held, %d not", self.store.path,
                 sum(k is not None for k in self.keys), len(inputs), sum(k is None for k in self.keys))  # fmt: skip
        return self.keys


def label_metadata(
    files: Sequence[Path], labels_csv: str | Path | None, folders: Sequence[Path], allow_unlabelled: bool,
    failed: Callable[[ImageError], None], scale: Scale, ungraded: bool = False, note: Callable[[str], None] = log.info,
) -> tuple[list[int], list[dict | None]]:  # fmt: skip
    """(positions of the files to add, metadata per file) from a label CSV (fundus_sdk.labels.match_labels),
    its grades read on the index's `scale`.

    Columns named like what the index derives itself (RESERVED) are kept under `label_<name>`,
    said to `note`. Files without a row go to `failed` unless allowed (then added ungraded).
    """
    if labels_csv is None:
        return list(range(len(files))), [None] * len(files)
    rows = read_labels(labels_csv, require_grade=False, grade_column=not ungraded, require_files=False, scale=scale)
    clashes = sorted({name for r in rows for name in r.fields if name in RESERVED})
    if clashes:
        note(f"{labels_csv}: column(s) {', '.join(clashes)} kept as {', '.join('label_' + c for c in clashes)} "
             f"(the index derives {', '.join(RESERVED)} itself)")  # fmt: skip
    keep, meta = [], []
    for i, (f, row) in enumerate(zip(files, match_labels(files, rows, folders))):
        if row is None:
            meta.append(None)
            if not allow_unlabelled:
                failed(ImageError(f, f"no row in {labels_csv} (--allow-unlabelled adds it without a grade)"))
                continue
        else:
            meta.append({("label_" + k if k in RESERVED else k): v for k, v in row.metadata().items()})
        keep.append(i)
    unlabelled = sum(m is None for m in meta)
    if allow_unlabelled and unlabelled:
        note(f"{unlabelled} photos have no row in {labels_csv} and are added without a grade")
    return keep, meta
