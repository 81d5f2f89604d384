"""Embedding files: the vectors `fundus-sdk embed` writes and `index add` reads back.

Three formats, named by the file's suffix (a name that says neither is refused):
- `.npz`: arrays `vectors` (n, dim) float32, `paths`, `sha256`, and the model's
  `model_fingerprint` and `model_name`, plus `verdicts` (the input gate's, JSON text per row)
  when the photos were checked;
- `.jsonl`: one JSON object per line with path, sha256, model_fingerprint, vector and, when
  checked, verdict.
- Parquet shards, a folder of them or one `.parquet` file, as `fundus-sdk embed --ray` writes
  them (fundus_sdk.cluster; reading them needs pyarrow, in the ray extra): one row per photo
  with path, sha256, vector, verdict, DICOM metadata and error, the model's fingerprint in the
  schema metadata. Rows with an error are read into `failed`.
All carry the model's fingerprint, so an index refuses vectors from another model.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .atomic import write_output
from .contract import unit_rows
from .errors import FundusError

FORMATS = {".npz": "npz", ".jsonl": "jsonl"}  # what `embed` writes
SHARD_FINGERPRINT = b"fundus_sdk.model_fingerprint"  # Parquet schema metadata of a shard
SHARD_MODEL = b"fundus_sdk.model_name"


class EmbeddingFileError(FundusError):
    """An embedding file that cannot be read; the message names the file and the reason."""


@dataclass
class Embeddings:
    """Vectors with the path and content hash of the photo each came from, and their model."""

    vectors: np.ndarray
    paths: list[str]
    sha256: list[str]
    model_fingerprint: str
    model_name: str = ""
    verdicts: list[dict[str, Any] | None] | None = None  # the input gate's (Verdict.to_dict), when checked
    metadata: list[dict[str, Any]] | None = None  # per row, from DICOM headers (Parquet shards only)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of photos without a vector

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows: Sequence[int]) -> "Embeddings":
        """These embeddings' rows at `rows` (their failed photos kept)."""
        rows = list(rows)
        pick = lambda values: None if values is None else [values[i] for i in rows]  # noqa: E731
        return Embeddings(self.vectors[rows], pick(self.paths), pick(self.sha256), self.model_fingerprint,
                          self.model_name, pick(self.verdicts), pick(self.metadata), self.failed)  # fmt: skip


def file_format(path: str | Path, fmt: str | None = None) -> str:
    """"npz" or "jsonl": from the suffix, or `fmt` where the name says nothing (stdout: "-").

    ValueError when the suffix names another format than `fmt`, or no format is known.
    """
    named = FORMATS.get(Path(path).suffix.lower()) if str(path) != "-" else None
    if fmt and named and fmt != named:
        raise ValueError(f"{path}: the name says {named}, the format asked for is {fmt}")
    if fmt or named:
        return fmt or named
    raise ValueError(f"{path}: cannot tell the format from the name: end it in .npz or .jsonl (or give the format)")


def _write(f: BinaryIO, embeddings: Embeddings, fmt: str) -> None:
    if fmt == "npz":
        np.savez(
            f,
            vectors=embeddings.vectors,
            paths=np.array(embeddings.paths, dtype=str),
            sha256=np.array(embeddings.sha256, dtype=str),
            model_fingerprint=np.array(embeddings.model_fingerprint),
            model_name=np.array(embeddings.model_name),
            **({} if embeddings.verdicts is None else
               {"verdicts": np.array([json.dumps(v) for v in embeddings.verdicts], dtype=str)}),
        )  # fmt: skip
        return
    verdicts = embeddings.verdicts or [None] * len(embeddings)
    for p, sha, vec, verdict in zip(embeddings.paths, embeddings.sha256, embeddings.vectors, verdicts):
        row = {"path": p, "sha256": sha, "model_fingerprint": embeddings.model_fingerprint, "vector": vec.tolist()}
        f.write((json.dumps(row | ({"verdict": verdict} if verdict is not None else {})) + "\n").encode())


def write_embeddings(path: str | Path | BinaryIO, embeddings: Embeddings, fmt: str | None = None) -> Path | None:
    """Write `embeddings` to a file or a binary stream (fundus_sdk.atomic.write_output: atomically,
    readable by its owner only; a link's target, a device or a pipe written through, never
    replaced). A stream needs `fmt`.
    """
    if not isinstance(path, (str, Path)):
        if fmt not in ("npz", "jsonl"):
            raise ValueError("writing to a stream needs the format: npz or jsonl")
        _write(path, embeddings, fmt)
        return None
    path = Path(path)
    fmt = file_format(path, fmt)
    with write_output(path, text=False) as f:
        _write(f, embeddings, fmt)
    return path


def is_embeddings(path: str | Path) -> bool:
    """Whether `path` names vectors rather than photos: an .npz, .jsonl or .parquet file, or a
    folder of Parquet shards."""
    path = Path(path)
    if path.is_dir():
        return any(path.glob("*.parquet"))
    return path.suffix.lower() in (*FORMATS, ".parquet")


def read_embeddings(path: str | Path) -> Embeddings:
    """Read an embedding file written by `write_embeddings` (or `embed --ray`'s Parquet shards);
    EmbeddingFileError names what is wrong."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet" or (path.is_dir() and path.suffix.lower() not in FORMATS):
            data = _read_parquet(path)
        else:
            data = _read_npz(path) if file_format(path) == "npz" else _read_jsonl(path)
    except EmbeddingFileError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise EmbeddingFileError(f"{path}: not a readable embedding file ({exc})") from exc
    bad = np.flatnonzero(~unit_rows(data.vectors)) if len(data.vectors) else []
    if len(bad):
        raise EmbeddingFileError(f"{path}: vector {bad[0]} ({data.paths[bad[0]]}) is not a finite unit vector, "
                                 "as `fundus-sdk embed` writes them")  # fmt: skip
    return data


def _read_parquet(path: Path) -> Embeddings:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmbeddingFileError(f"{path}: reading Parquet shards needs pyarrow: pip install 'fundus-sdk[ray]'") from None
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise EmbeddingFileError(f"{path}: no .parquet shards in this folder")
    rows: dict[str, list] = {k: [] for k in ("path", "sha256", "vector", "verdict", "metadata", "error")}
    models: dict[str, str] = {}
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow's own error types
            raise EmbeddingFileError(f"{file}: not a readable Parquet shard ({exc})") from exc
        meta = table.schema.metadata or {}
        if SHARD_FINGERPRINT not in meta or set(rows) - set(table.column_names):
            raise EmbeddingFileError(f"{file}: not a shard written by `fundus-sdk embed --ray`")
        models[meta[SHARD_FINGERPRINT].decode()] = meta.get(SHARD_MODEL, b"").decode()
        for k, v in table.select(list(rows)).to_pydict().items():
            rows[k] += v
    if len(models) > 1:
        raise EmbeddingFileError(f"{path}: shards from {len(models)} different models")
    (fingerprint, name), = models.items()
    good = [i for i, e in enumerate(rows["error"]) if e is None]
    verdicts = [json.loads(rows["verdict"][i]) if rows["verdict"][i] else None for i in good]
    return Embeddings(
        np.array([rows["vector"][i] for i in good], dtype=np.float32).reshape(len(good), -1),
        [rows["path"][i] for i in good], [rows["sha256"][i] for i in good], fingerprint, name,
        verdicts if any(v is not None for v in verdicts) else None,
        [json.loads(rows["metadata"][i]) if rows["metadata"][i] else {} for i in good],
        [(p, e) for p, e in zip(rows["path"], rows["error"]) if e is not None],
    )  # fmt: skip


NPZ_SHAPES = {"vectors": 2, "paths": 1, "sha256": 1, "verdicts": 1, "model_fingerprint": 0, "model_name": 0}
NPZ_MAX_CHARS = {"paths": 4096, "sha256": 64, "verdicts": 65536, "model_fingerprint": 256, "model_name": 256}


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's (shape, dtype) from its .npy header, read without decompressing the data."""
    headers = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            headers[info.filename.removesuffix(".npy")] = (shape, dtype)
    return headers


def _check_npz(path: Path, headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Refuse, before loading anything, arrays that `embed` would not have written: wrong rank,
    dtype or length, or text longer than any path or hash (what an inflated file would be)."""
    missing = [k for k in ("vectors", "paths", "sha256", "model_fingerprint") if k not in headers]
    if missing:
        raise EmbeddingFileError(f"{path}: not an embedding file from `fundus-sdk embed` (missing {', '.join(missing)})")
    n = headers["vectors"][0][0] if headers["vectors"][0] else -1
    for name, (shape, dtype) in headers.items():
        rank = NPZ_SHAPES.get(name)
        text = name in NPZ_MAX_CHARS
        wrong = (
            rank is None or len(shape) != rank or (rank and shape[0] != n)
            or (dtype.kind != "U" if text else dtype.kind != "f")
            or (text and dtype.itemsize // 4 > NPZ_MAX_CHARS[name])
        )  # fmt: skip
        if wrong:
            raise EmbeddingFileError(
                f"{path}: array {name!r} of shape {shape} and type {dtype} does not belong in an embedding file "
                f"from `fundus-sdk embed` ({n} vectors)"
            )


def _read_npz(path: Path) -> Embeddings:
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            raise EmbeddingFileError(f"{path}: a single array (.npy), not an embedding file from `fundus-sdk embed`")
    if not zipfile.is_zipfile(path):
        raise EmbeddingFileError(f"{path}: not a readable embedding file (not a zip archive, as an .npz is)")
    _check_npz(path, _npz_headers(path))
    with np.load(path, allow_pickle=False) as data:
        return Embeddings(
            np.asarray(data["vectors"], dtype=np.float32),
            data["paths"].tolist(),
            data["sha256"].tolist(),
            str(data["model_fingerprint"]),
            str(data["model_name"]) if "model_name" in data else "",
            [json.loads(v) for v in data["verdicts"].tolist()] if "verdicts" in data else None,
        )


def _read_jsonl(path: Path) -> Embeddings:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fingerprints = {r["model_fingerprint"] for r in rows}
    if len(fingerprints) > 1:
        raise EmbeddingFileError(f"{path}: rows from {len(fingerprints)} different models")
    vectors = np.array([r["vector"] for r in rows], dtype=np.float32)
    verdicts = [r.get("verdict") for r in rows]
    return Embeddings(
        vectors, [r["path"] for r in rows], [r["sha256"] for r in rows], fingerprints.pop() if rows else "",
        verdicts=verdicts if any(v is not None for v in verdicts) else None,
    )  # fmt: skip
