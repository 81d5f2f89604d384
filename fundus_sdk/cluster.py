"""Embedding a whole archive on a Ray cluster (the `ray` extra): `embed_on_ray(source, out_dir)`.

Ray Data does the work and the bookkeeping: the photos are listed here (local paths, or any URI
that pyarrow's filesystems read, such as s3://), read by Ray (`read_binary_files`), decoded and
preprocessed in tasks, embedded by a pool of actors that each load the ONNX model once (CPU
actors, or GPU actors with onnxruntime-gpu), and written as Parquet shards. Ray retries the
tasks and restarts the actors of a worker that dies, so nothing is lost; a shard is written once
per block. Each shard holds one row per photo: path, sha256, vector, the input gate's verdict
(JSON, where the model has a gate), the DICOM header's case metadata (JSON), and error (the
reason a photo could not be embedded, else null); its schema metadata names the model
(SHARD_FINGERPRINT, SHARD_MODEL). A re-run lists what the shards in `out_dir` already hold and
embeds only the rest; `fundus-sdk index add DIR OUT_DIR/` reads them (fundus_sdk.embeddings),
checking the fingerprint as for any embedding file.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embeddings import SHARD_FINGERPRINT, SHARD_MODEL
from .errors import FundusError, ImageError
from .gate import Signals
from .inputs import photo_by_name
from .model import Model, Providers, load_model, provider_name, resolve_providers
from .preprocess import Preprocess

log = logging.getLogger(__name__)
SIGNALS = tuple(Signals.__dataclass_fields__)


class ClusterError(FundusError):
    """The archive, the output folder or the cluster cannot be used; the message says why."""


def _ray():
    try:
        import pyarrow  # noqa: F401
        import ray
    except ImportError as exc:
        raise ClusterError(f"embedding on Ray needs the ray extra: pip install 'fundus-sdk[ray]' ({exc})") from None
    return ray


def _filesystem(location: str):
    """(pyarrow filesystem, path inside it) of a local path or a URI such as s3://bucket/photos."""
    import pyarrow.fs as pafs

    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as exc:  # pyarrow raises ArrowInvalid and friends
            raise ClusterError(f"{location}: cannot open this location ({exc})") from exc
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def list_photos(source: str) -> list[str]:
    """Every photo under `source` (a file or folder, recursively), by name: raster suffixes,
    DICOM's and none (PACS exports); hidden files and other suffixes are left out."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(source)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ClusterError(f"{source}: no such file or folder")
    if info.type == pafs.FileType.File:
        return [root]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))

    # inputs' rule; a suffix-less file is kept, to be read and judged by its content on the cluster
    return sorted(i.path for i in found if i.type == pafs.FileType.File and photo_by_name(i.base_name) is not False)


def _uri(source: str, path: str) -> str:
    """A listed path as Ray should read it (the scheme kept for remote filesystems)."""
    return f"{source.split('://', 1)[0]}://{path}" if "://" in source else path


@dataclass(frozen=True)
class Shards:
    """What the Parquet shards in a folder hold."""

    paths: set[str]  # every photo with a row (as Ray names it: without the URI scheme)
    failed: set[str]  # the photos whose row is an error
    fingerprint: str | None  # the model's (None: no shards)


def key(path: str) -> str:
    """A photo's name in the shards: its path without the URI scheme (as Ray reports it)."""
    return path.split("://", 1)[-1]


def read_shards(out_dir: str) -> Shards:
    """The shards in `out_dir`. Unreadable ones (a run killed while writing) are removed, so
    that their photos are embedded again."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = _filesystem(out_dir)
    paths: set[str] = set()
    failed: set[str] = set()
    fingerprints: set[str] = set()
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return Shards(paths, failed, None)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if not info.path.endswith(".parquet"):
            continue
        try:
            with fs.open_input_file(info.path) as f:
                table = pq.read_table(f, columns=["path", "error"])
        except Exception as exc:  # a truncated file: pyarrow's own error types
            log.warning("%s: unreadable shard (%s), removed: its photos are embedded again", info.path, exc)
            fs.delete_file(info.path)
            continue
        fingerprints.add((table.schema.metadata or {}).get(SHARD_FINGERPRINT, b"").decode())
        rows = table.to_pydict()
        paths.update(rows["path"])
        failed.update(p for p, e in zip(rows["path"], rows["error"]) if e is not None)
    if len(fingerprints) > 1:
        raise ClusterError(f"{out_dir}: holds shards of {len(fingerprints)} different models")
    return Shards(paths, failed, fingerprints.pop() if fingerprints else None)


def _prepare(batch: dict[str, np.ndarray], preprocess: Preprocess) -> dict[str, Any]:
    """Ray task: file bytes -> preprocessed pixels, identity, gate signals, DICOM metadata or error."""
    size = preprocess.size
    n = len(batch["path"])
    out: dict[str, Any] = {
        "path": [str(p) for p in batch["path"]],
        "pixels": np.zeros((n, size, size, 3), np.uint8),
        "sha256": [""] * n, "metadata": [""] * n, "error": [""] * n,  # "": none (Ray makes all-None columns float)
        **{s: np.zeros(n, np.float64) for s in SIGNALS},
    }  # fmt: skip
    for i, (data, path) in enumerate(zip(batch["bytes"], out["path"])):
        stream = io.BytesIO(bytes(data))
        stream.name = path  # errors name the file
        try:
            prepared, decoded = preprocess.load(stream)
        except ImageError as err:
            out["error"][i] = err.reason
            continue
        out["pixels"][i] = prepared.pixels
        out["sha256"][i] = decoded.sha256
        out["metadata"][i] = json.dumps(decoded.metadata, default=str) if decoded.metadata else ""
        for s in SIGNALS:
            out[s][i] = getattr(prepared.signals, s)
    return out


class _Embedder:
    """Ray actor: loads the model once, then embeds and judges batch after batch."""

    def __init__(self, model_path: str, providers: list, threads: int, check: bool) -> None:
        self.model = Model.load(model_path, providers, threads)
        self.check = check

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        ok = np.array([not e for e in batch["error"]], bool)
        vectors: list[list[float] | None] = [None] * len(ok)
        verdicts: list[str | None] = [None] * len(ok)
        if ok.any():
            found = self.model.run(np.ascontiguousarray(batch["pixels"][ok]))
            for i, vector in zip(np.flatnonzero(ok), found):
                vectors[i] = vector.tolist()
                signals = Signals(**{s: (int if s == "fov_side" else float)(batch[s][i]) for s in SIGNALS})
                verdict = self.model.judge(vector, signals) if self.check else None
                verdicts[i] = json.dumps(verdict.to_dict()) if verdict else None

        def text(column: str) -> pa.Array:
            return pa.array([str(v) or None for v in batch[column]], pa.string())

        table = pa.table({
            "path": text("path"), "sha256": text("sha256"),
            "vector": pa.array(vectors, pa.list_(pa.float32(), self.model.dim)),
            "verdict": pa.array(verdicts, pa.string()), "metadata": text("metadata"), "error": text("error"),
        })  # fmt: skip
        return table.replace_schema_metadata(
            {SHARD_FINGERPRINT: self.model.fingerprint.encode(), SHARD_MODEL: self.model.name.encode()}
        )


@dataclass(frozen=True)
class RayReport:
    """What `embed_on_ray` did."""

    out_dir: str
    listed: int  # photos found under the source
    skipped: int  # already in the shards of out_dir (an earlier run)
    embedded: int  # rows written by this run, errors included
    failed: int  # of which rows with an error
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def embed_on_ray(
    source: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    model: str | Path | None = None,
    address: str | None = None,
    actors: int | None = None,
    threads: int = 1,
    providers: Providers = None,
    batch_size: int = 16,
    check: bool = True,
    rows_per_file: int = 10_000,
) -> RayReport:
    """Embed every photo under `source` on Ray and write Parquet shards to `out_dir`.

    `source`: files or folders, local or URIs (s3://...). `address`: the cluster to join (None
    or "local": start one on this machine; "auto": the one this machine belongs to; "ray://..."
    a remote one). `actors`: how many model actors (default: one per `threads` CPUs of the
    cluster, less one CPU for reading and decoding); each runs ONNX Runtime with `threads`
    threads, on a GPU when `providers` asks for CUDA. A re-run embeds only photos not yet in
    `out_dir`; shards of another model there are an error (ClusterError).
    """
    ray = _ray()
    started = time.perf_counter()
    m = load_model(model, "cpu")  # the driver reads the model's identity; the actors run it
    wanted = resolve_providers(providers)
    gpu = "CUDAExecutionProvider" in map(provider_name, wanted)
    sources = [str(s) for s in ([source] if isinstance(source, (str, Path)) else source)]
    listed = sorted({_uri(s, p) for s in sources for p in list_photos(s)})
    before = read_shards(str(out_dir))
    if before.fingerprint and before.fingerprint != m.fingerprint:
        raise ClusterError(
            f"{out_dir}: holds shards of another model (fingerprint {before.fingerprint[:12]}, not {m.name} "
            f"{m.fingerprint[:12]}): write to a new folder"
        )
    todo = [p for p in listed if key(p) not in before.paths]
    if not todo:
        return RayReport(str(out_dir), len(listed), len(listed), 0, 0, time.perf_counter() - started)
    if not ray.is_initialized():
        ray.init(address=None if address in (None, "local") else address, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = actors or (max(1, gpus) if gpu else max(1, (cpus - 1) // threads))
    if not gpu and pool * threads >= cpus:
        raise ClusterError(
            f"{pool} actor(s) x {threads} thread(s) take all {cpus} CPUs of the cluster and leave none for reading and "
            "decoding the photos: ask for fewer actors or threads"
        )
    ds = ray.data.read_binary_files(todo, include_paths=True)
    # decoding runs in tasks (retried when their worker dies; the distinct remote args also keep
    # Ray from fusing them into the model actors), embedding in the actor pool
    ds = ds.map_batches(_prepare, fn_kwargs={"preprocess": m.preprocess}, batch_size=batch_size, num_cpus=1, max_retries=5)
    ds = ds.map_batches(
        _Embedder, fn_constructor_kwargs={"model_path": str(m.path), "providers": wanted, "threads": threads, "check": check},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=0 if gpu else threads,
        num_gpus=1 if gpu else 0,
    )  # fmt: skip
    ds.write_parquet(str(out_dir), min_rows_per_file=rows_per_file)
    after = read_shards(str(out_dir))
    new = after.paths - before.paths
    return RayReport(
        str(out_dir), len(listed), len(listed) - len(todo), len(new), len(after.failed & new), time.perf_counter() - started
    )
