"""The vectors of an index in memory: usearch indexes, their settings, their files.

The store (fundus_sdk.store) decides which vectors to hold; this module knows how they are
held and searched: the HNSW settings recorded with each index, a usearch file written and
read back with its checksum, and the overlay that lets a read-only reader keep a memory-mapped
file and apply the changes logged after it without copying it.
"""

from __future__ import annotations

import errno
import hashlib
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np

# onnxruntime must be loaded before usearch's extension: the other order crashed with usearch 2.26.
import onnxruntime  # noqa: F401, I001
from usearch.index import Index as USearch

from .atomic import FILE_MODE, write_atomically


@dataclass(frozen=True)
class Settings:
    """How an index searches and commits, recorded in it when it is created and read back at opening.

    Indexes of up to `exact_below` cases are searched exactly (brute force takes about a
    millisecond there); larger ones use usearch's HNSW graph, built with `connectivity` links per
    node and `expansion_add`, searched at depth `expansion_search` (four times usearch's default
    of 64, whose recall@10 was poor). A writer waits `lock_timeout` seconds for another process's
    write; `log_limit` changes are logged in SQLite before the vector file is rewritten. Recall
    and speed at 100k and 1M cases: benchmarks/search_recall.py and benchmarks/RESULTS.md.
    """

    exact_below: int = 20_000
    connectivity: int = 32  # usearch's default is 16: recall@10 0.969 at 1M clustered vectors, 32: 0.993
    expansion_add: int = 128  # usearch's default
    expansion_search: int = 256
    lock_timeout: float = 30.0
    log_limit: int = 4096

    def to_info(self) -> dict[str, str]:
        """The settings as the index's `info` table records them."""
        return {name: str(value) for name, value in asdict(self).items()}

    @classmethod
    def from_info(cls, info: dict[str, str], defaults: "Settings | None" = None) -> "Settings":
        """The settings an index recorded; what an older index did not record comes from `defaults`."""
        base = defaults or cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = info.get(f.name)
            values[f.name] = getattr(base, f.name) if raw is None else type(getattr(base, f.name))(float(raw))
        return cls(**values)


class Matches(NamedTuple):
    keys: np.ndarray  # (count,), or (queries, count) for a batch
    distances: np.ndarray
    counts: np.ndarray | None = None  # for a batch: how many of each row's entries are real


class Overlay:
    """A memory-mapped usearch index (which cannot change) with the changes logged after it,
    searched as one: added vectors by brute force, removed keys filtered out. Readers use it so
    that opening stays a memory map however many changes are logged (at most `log_limit`).
    `changed` returns a new overlay, so that a reader's threads keep searching the old one."""

    def __init__(self, base: USearch, keys: np.ndarray | None = None, vecs: np.ndarray | None = None,
                 gone: frozenset[int] = frozenset()) -> None:  # fmt: skip
        self.base = base
        self.keys = np.empty(0, np.uint64) if keys is None else keys
        self.vecs = np.empty((0, base.ndim), np.float32) if vecs is None else vecs
        self.gone = gone

    def __len__(self) -> int:
        return len(self.base) - len(self.gone) + len(self.keys)

    def changed(self, keys: np.ndarray, vecs: np.ndarray, removed: np.ndarray) -> "Overlay":
        """This overlay with `removed` taken out and (`keys`, `vecs`) added."""
        dropped = np.isin(self.keys, removed)
        gone = self.gone | ({int(k) for k in removed} - {int(k) for k in self.keys[dropped]})
        return Overlay(
            self.base, np.concatenate([self.keys[~dropped], np.asarray(keys, np.uint64)]),
            np.vstack([self.vecs[~dropped], np.asarray(vecs, np.float32).reshape(-1, self.base.ndim)]), frozenset(gone),
        )  # fmt: skip

    def search(self, vecs: np.ndarray, count: int, exact: bool = False) -> Matches:
        """Like usearch's search: one query (1-D) or a batch (2-D, with counts)."""
        if vecs.ndim == 2:
            rows = [self.search(v, count, exact) for v in vecs]
            keys = np.zeros((len(rows), count), np.uint64)
            distances = np.full((len(rows), count), np.nan, np.float32)
            for i, r in enumerate(rows):
                keys[i, : len(r.keys)], distances[i, : len(r.keys)] = r.keys, r.distances
            return Matches(keys, distances, np.array([len(r.keys) for r in rows]))
        keys, distances = self.keys, 1.0 - self.vecs @ vecs
        if len(self.base):
            found = self.base.search(vecs, min(len(self.base), count + len(self.gone)), exact=exact)
            keep = np.fromiter((int(k) not in self.gone for k in found.keys), bool, len(found.keys))
            keys = np.concatenate([found.keys[keep].astype(np.uint64), keys])
            distances = np.concatenate([found.distances[keep], distances])
        best = np.argsort(distances, kind="stable")[:count]
        return Matches(keys[best], distances[best])


Vectors = Union[USearch, Overlay]


def empty(dim: int, dtype: str, settings: Settings) -> USearch:
    """A new, empty usearch index of cosine similarity with `settings`' graph."""
    return USearch(ndim=dim, metric="cos", dtype=dtype, connectivity=settings.connectivity,
                   expansion_add=settings.expansion_add, expansion_search=settings.expansion_search)  # fmt: skip


def updated(vectors: Vectors, keys: np.ndarray, vecs: np.ndarray, removed: np.ndarray) -> Vectors:
    """`vectors` with logged changes applied: a new Overlay, or the usearch index changed in place."""
    if isinstance(vectors, Overlay):
        return vectors.changed(keys, vecs, removed)
    if len(removed):
        vectors.remove(removed)
    if len(keys):
        vectors.add(keys, vecs)
    return vectors


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, read in pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(vectors: USearch, file: Path) -> str:
    """Write `vectors` to `file` (aside, fsync, rename); returns the file's sha256."""
    with write_atomically(file, mode=FILE_MODE) as tmp:
        try:
            vectors.save(str(tmp))
        except RuntimeError as exc:  # usearch's error for a failed write, e.g. a full disk
            raise OSError(errno.EIO, f"cannot write the vector file ({exc}; is the disk full?)", str(tmp)) from exc
        return file_sha256(tmp)


def restore(file: Path, recorded_sha256: str | None, view: bool, settings: Settings) -> Vectors | None:
    """The usearch index in `file` if its checksum is the recorded one, else None (the caller
    rebuilds it from SQLite); memory-mapped under an Overlay with `view`, loaded otherwise."""
    if recorded_sha256 is not None and file_sha256(file) != recorded_sha256:
        warnings.warn(f"{file}: checksum differs from the one recorded at commit; rebuilt from the database", stacklevel=5)
        return None
    try:
        header = USearch.metadata(str(file))
        if header is None or header.get("count_deleted"):  # removed slots abort usearch 2.25's restore
            warnings.warn(f"{file}: holds removed vectors, which this usearch cannot read back; rebuilt from the database",
                          stacklevel=5)  # fmt: skip
            return None
        vectors = USearch.restore(str(file), view=view)
    except FileNotFoundError:
        raise
    except Exception:  # usearch raises plain RuntimeErrors for damaged files
        return None
    vectors.expansion_search = settings.expansion_search
    return Overlay(vectors) if view else vectors


def holds_removed_slots(vectors: Vectors) -> bool:
    """Whether `vectors` keep slots of removed vectors, which usearch 2.25 saves but cannot read back."""
    return isinstance(vectors, USearch) and vectors.stats.nodes > len(vectors)
