"""usearch (HNSW) vs exact numpy brute force on 256-d vectors at 100k and 1M cases.

Why: fundus_sdk.Index searches indexes above `Settings.exact_below` cases with usearch's HNSW graph
at depth `Settings.expansion_search`, stores vectors as f16 by default, and memory-maps the vector
file when opened read-only. This measures what those choices buy and cost, per size:
- build: time to add all vectors (and vectors/s), the peak memory the build added, and the
  file size on disk, for f16 and f32 storage (numpy's memory: its float32 matrix);
- search: queries/s for a batch of queries (all cores) and the median latency of one query at
  a time (as Index.search runs them) for usearch at each expansion_search (default 64 and 256)
  and for numpy brute force (float32 matmul over blocks of queries + argpartition, all cores
  through BLAS); usearch's recall@k against the exact result;
- opening: usearch `Index.restore(path, view=True)` (memory map) vs `restore(path)` (full
  read), and fundus_sdk `Index.open(read_only=True)` vs `Index.open()` on an index directory
  holding the same vectors. The file was just written, so these are warm-page-cache figures.

Vectors: real embeddings do not exist at this scale, so two synthetic sets are measured.
"clustered": unit vectors around --clusters random unit centres with Zipf-distributed cluster
sizes (a few large clusters, many small ones), all shifted along one shared direction (--offset:
descriptors of one kind of photograph share a large mean component, so unrelated photos still
have a clearly positive cosine); the spread around each centre lies mostly in one shared
--intrinsic-dimensional random subspace (CNN descriptors concentrate their variance in few
principal directions) plus 10% isotropic noise, with --noise setting its size. "random":
uniform on the sphere, no structure (the hardest case for a graph index). Queries are fresh
draws from the same distribution. The neighbour similarities printed for each set let you
compare it with real embeddings (e.g. an .npz from `fundus-sdk embed`).

Each configuration (size, vector set, engine and storage) runs in its own subprocess, so its
peak memory (VmHWM of /proc/self/status, reset through /proc/self/clear_refs before each
phase) is its own. Builds are slow on 2 cores: progress goes to stderr; --sizes, --kinds and
--dtypes select a subset. Run it on idle cores: on busy ones every multi-threaded BLAS call
waits for a time slice (one-query numpy latency measured 8 ms instead of 0.04 ms at 2000
vectors; --blas-threads 1 avoids that, at the cost of the batch figure).

    python -m benchmarks.search_speed                      # 100k and 1M, both sets, f16 and f32
    python -m benchmarks.search_speed --sizes 100000 --kinds clustered
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from fundus_sdk import Index, load_model  # imports onnxruntime before usearch (see fundus_sdk/index.py)
from fundus_sdk.tables import format_table
from usearch.index import Index as USearch

from .common import REPO, measure, print_header, ratio, seconds

KINDS = ("clustered", "random")
T = TypeVar("T")
CHUNK = 50_000  # vectors generated per step, to keep generation's own peak memory small


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="indexed vectors (default: 100000 1000000)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="vector sets (default: both)")
    p.add_argument("--dtypes", nargs="+", choices=["f16", "f32"], default=["f16", "f32"], help="usearch storage (default: both)")
    p.add_argument("--ef", type=int, nargs="+", default=[64, 256], help="usearch expansion_search values (default: 64 256)")
    p.add_argument("--dim", type=int, default=256, help="vector dimension (default 256, the model's)")
    p.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--queries", type=int, default=1000, help="queries in the batch measurement and for recall (default 1000)")
    p.add_argument("--latency-queries", type=int, default=100, help="queries timed one at a time (default 100)")
    p.add_argument("--query-batch", type=int, default=64, help="queries per numpy matmul block (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each batch search and open (default 3)")
    p.add_argument("--clusters", type=int, default=1000, help="clustered: number of clusters (default 1000)")
    p.add_argument("--intrinsic", type=int, default=32, help="clustered: dimension of the spread (default 32)")
    p.add_argument("--noise", type=float, default=1.0,
                   help="clustered: length of the spread around a centre; centres have length 1 (default 1.0)")
    p.add_argument("--offset", type=float, default=1.5, help="clustered: length of the shared mean component (default 1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blas-threads", type=int, help="numpy's BLAS threads in the measurements (default: its own, all cores)")
    p.add_argument("--tmp", type=Path, help="where index files go (default: the system temp dir; needs ~2.5 GB at 1M)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, JSON; used by the parent
    return p.parse_args()


# -- data -----------------------------------------------------------------------------------------


def unit(x: np.ndarray) -> np.ndarray:
    """Normalise rows to unit length, in place."""
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def dataset(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, queries), float32 unit rows, deterministic for the seed (see the module doc)."""
    n, q, dim = cfg["size"], cfg["queries"], cfg["dim"]
    rng = np.random.default_rng(cfg["seed"])
    if cfg["kind"] == "random":
        def draw(count: int) -> np.ndarray:
            return unit(rng.standard_normal((count, dim), dtype=np.float32))
    else:
        clusters, r = cfg["clusters"], min(cfg["intrinsic"], dim)
        shared = unit(rng.standard_normal((1, dim), dtype=np.float32)) * np.float32(cfg["offset"])
        centres = unit(rng.standard_normal((clusters, dim), dtype=np.float32)) + shared
        basis = np.linalg.qr(rng.standard_normal((dim, r)))[0].T.astype(np.float32)  # r orthonormal rows
        weights = 1.0 / np.arange(1, clusters + 1)
        weights /= weights.sum()
        spread = cfg["noise"]

        def draw(count: int) -> np.ndarray:
            labels = rng.choice(clusters, size=count, p=weights)
            low = rng.standard_normal((count, r), dtype=np.float32) @ basis * np.float32(spread * np.sqrt(0.9 / r))
            iso = rng.standard_normal((count, dim), dtype=np.float32) * np.float32(spread * np.sqrt(0.1 / dim))
            return unit(centres[labels] + low + iso)

    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, CHUNK):
        vectors[start : start + CHUNK] = draw(min(CHUNK, n - start))
    return vectors, draw(q)


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities) of each query's k most similar vectors, best first: brute force."""
    indices = np.empty((len(queries), k), np.int64)
    sims = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), block):
        s = queries[start : start + block] @ vectors.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_sims, axis=1)
        indices[start : start + block] = np.take_along_axis(top, order, axis=1)
        sims[start : start + block] = np.take_along_axis(top_sims, order, axis=1)
    return indices, sims


# -- measuring in the child ---------------------------------------------------------------------


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e6
    raise KeyError(field)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_of(fn: Callable[..., T], *args: object) -> tuple[T, float, float]:
    """(fn(*args), seconds, MB the process's peak RSS rose above its RSS before the call)."""
    before = status_mb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - start
    return result, elapsed, max(0.0, status_mb("VmHWM") - before)


def log(cfg: dict, message: str) -> None:
    print(f"  [{cfg['label']}] {message}", file=sys.stderr, flush=True)


def one_at_a_time(search: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    """Median seconds of a one-query search over `queries`."""
    times = []
    for q in queries:
        start = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top k that the approximate top k holds."""
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def build(cfg: dict, vectors: np.ndarray) -> USearch:
    """usearch index of `vectors` (keys 1..n), fundus_sdk's settings, added in steps with progress."""
    index = USearch(ndim=cfg["dim"], metric="cos", dtype=cfg["dtype"])
    n = len(vectors)
    step = max(1000, n // 10)
    start = time.perf_counter()
    for first in range(0, n, step):
        last = min(n, first + step)
        index.add(np.arange(first + 1, last + 1, dtype=np.uint64), vectors[first:last], threads=0)
        elapsed = time.perf_counter() - start
        log(cfg, f"added {last}/{n} ({last / elapsed:.0f} vectors/s, {elapsed:.0f} s, ETA {elapsed * (n - last) / last:.0f} s)")
    return index


def sdk_directory(folder: Path, index: USearch, vectors: np.ndarray, dtype: str) -> Path:
    """A fundus_sdk index directory holding `vectors` (keys 1..n) with `index` as its vector file.

    Built from the documented layout (fundus_sdk/index.py): rows go straight into cases.sqlite
    and the usearch file is saved as the current generation's, so no second graph build is needed.
    """
    Index.create(folder, model=load_model(), dtype=dtype).close()
    conn = sqlite3.connect(folder / "cases.sqlite", isolation_level=None)
    generation = conn.execute("SELECT value FROM info WHERE name = 'generation'").fetchone()[0]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO cases (key, grade, added, vector) VALUES (?, ?, ?, ?)",
        ((i + 1, i % 5, now, v.tobytes()) for i, v in enumerate(vectors)),
    )
    conn.execute("COMMIT")
    conn.close()
    index.save(str(folder / f"vectors-{generation}.usearch"))
    return folder / f"vectors-{generation}.usearch"


def open_sdk(folder: Path, vector_file: Path, read_only: bool) -> None:
    """Open and close the directory with fundus_sdk.Index; refuse to report a rebuild as an open."""
    stamp = vector_file.stat().st_mtime_ns
    with Index.open(folder, read_only=read_only):
        pass
    if not vector_file.is_file() or vector_file.stat().st_mtime_ns != stamp:
        raise SystemExit(f"fundus_sdk.Index rebuilt {folder} instead of opening it: the index layout changed")


def child(cfg: dict) -> dict:
    """Measure one configuration; the result as a JSON-able dict."""
    log(cfg, "making vectors")
    vectors, queries = dataset(cfg)
    k, repeats = cfg["k"], cfg["repeats"]
    (exact, exact_sims), _, exact_peak = peak_of(exact_topk, vectors, queries, k, cfg["query_batch"])
    rng = np.random.default_rng(cfg["seed"] + 1)
    pairs = rng.integers(0, len(vectors), size=(10_000, 2))
    out = {
        **cfg,
        "peak_reset": reset_peak(),
        "stats": {
            "top1": float(exact_sims[:, 0].mean()),
            "topk": float(exact_sims[:, -1].mean()),
            "random_pair": float(np.einsum("ij,ij->i", vectors[pairs[:, 0]], vectors[pairs[:, 1]]).mean()),
        },
    }
    singles = queries[: cfg["latency_queries"]]
    if cfg["engine"] == "numpy":
        log(cfg, "brute force")
        # the ground-truth pass above was the warm-up
        batch = measure(lambda: exact_topk(vectors, queries, k, cfg["query_batch"]), repeats, warmup=0)
        single = one_at_a_time(lambda q: exact_topk(vectors, q[None], k, 1), singles)
        out |= {
            "memory_mb": vectors.nbytes / 1e6,
            "search_peak_mb": exact_peak,
            "search": [{"ef": None, "qps": batch.rate(len(queries)), "recall": 1.0, "latency_s": single}],
        }
        return out

    log(cfg, "building")
    index, build_s, build_peak = peak_of(build, cfg, vectors)
    out |= {"build_s": build_s, "memory_mb": build_peak, "search": []}
    for ef in cfg["ef"]:
        log(cfg, f"searching, expansion_search {ef}")
        index.expansion_search = ef
        batch = measure(lambda: index.search(queries, k, threads=0), repeats, warmup=1)
        found = index.search(queries, k, threads=0).keys.astype(np.int64) - 1
        single = one_at_a_time(lambda q: index.search(q, k), singles)
        out["search"].append({"ef": ef, "qps": batch.rate(len(queries)), "recall": recall(found, exact), "latency_s": single})

    with tempfile.TemporaryDirectory(prefix="search-speed-", dir=cfg["tmp"]) as tmp:
        log(cfg, "saving and opening")
        file = Path(tmp) / "vectors.usearch"
        start = time.perf_counter()
        index.save(str(file))
        out |= {
            "file_mb": file.stat().st_size / 1e6,
            "save_s": time.perf_counter() - start,
            "restore_view_s": measure(lambda: USearch.restore(str(file), view=True), repeats).median,
            "restore_load_s": measure(lambda: USearch.restore(str(file)), repeats).median,
        }
        if load_model().dim != cfg["dim"]:
            log(cfg, "fundus_sdk.Index open skipped: the bundled model's dimension differs from --dim")
            return out | {"sdk_read_only_s": None, "sdk_read_write_s": None}
        log(cfg, "writing a fundus_sdk index directory of the same vectors")
        folder = Path(tmp) / "index"
        vector_file = sdk_directory(folder, index, vectors, cfg["dtype"])
        out |= {
            "sdk_read_only_s": measure(lambda: open_sdk(folder, vector_file, True), repeats).median,
            "sdk_read_write_s": measure(lambda: open_sdk(folder, vector_file, False), repeats).median,
        }
    return out


# -- the parent ------------------------------------------------------------------------------------


def run_child(cfg: dict, blas_threads: int | None) -> dict:
    """Run one configuration in a fresh interpreter (stderr shows its progress)."""
    started = time.perf_counter()
    env = dict(os.environ)
    if blas_threads:
        env |= {name: str(blas_threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.search_speed", "--child", json.dumps(cfg)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"configuration {cfg['label']} failed (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  [{cfg['label']}] done in {seconds(time.perf_counter() - started)}", file=sys.stderr, flush=True)
    return result


def optional_seconds(s: float | None) -> str:
    return "-" if s is None else seconds(s)


def report(results: list[dict]) -> None:
    """Print the tables for one (size, vector set)."""
    brute = next(r for r in results if r["engine"] == "numpy")
    graphs = [r for r in results if r["engine"] == "usearch"]
    s = brute["stats"]
    print(f"\n--- {brute['size']:,} {brute['kind']} vectors, {brute['dim']}-d; {brute['queries']} queries, k={brute['k']} ---")
    print(f"mean cosine of a query to its nearest vector {s['top1']:.3f}, to its {brute['k']}th {s['topk']:.3f}; "
          f"of two random vectors {s['random_pair']:.3f}")
    if not all(r["peak_reset"] for r in results):
        print("note: /proc/self/clear_refs was not writable: peaks may include earlier phases")
    b = brute["search"][0]
    print(format_table(
        ["engine", "storage", "build", "vectors/s", "memory MB", "file MB"],
        [["numpy brute force", "f32", "-", "-", f"{brute['memory_mb']:.0f}", "-"]]
        + [["usearch HNSW", r["dtype"], seconds(r["build_s"]), f"{r['size'] / r['build_s']:.0f}", f"{r['memory_mb']:.0f}",
            f"{r['file_mb']:.0f}"] for r in graphs],
    ))
    print(f"(memory: numpy = its float32 matrix, and its search's blocks of {brute['query_batch']} queries added a peak of "
          f"{brute['search_peak_mb']:.0f} MB; usearch = the peak RSS its build added over the process's RSS before it)\n")
    rows = [["numpy brute force", "f32", "exact", f"{b['qps']:.0f}", "1.00x", "1.000", f"{b['latency_s'] * 1e3:.2f}", "1.00x"]]
    for r in graphs:
        for m in r["search"]:
            rows.append(["usearch HNSW", r["dtype"], m["ef"], f"{m['qps']:.0f}", ratio(m["qps"], b["qps"]), f"{m['recall']:.3f}",
                         f"{m['latency_s'] * 1e3:.2f}", ratio(b["latency_s"], m["latency_s"])])
    print(format_table(["engine", "storage", "expansion_search", "batch queries/s", "vs numpy", f"recall@{brute['k']}",
                 "1-query ms (median)", "speed-up vs numpy"], rows))
    if graphs:
        print()
        print(format_table(
            ["storage", "restore view", "restore load", "load / view", "Index.open read-only", "Index.open read-write", "save"],
            [[r["dtype"], seconds(r["restore_view_s"]), seconds(r["restore_load_s"]), ratio(r["restore_load_s"], r["restore_view_s"]),
              optional_seconds(r["sdk_read_only_s"]), optional_seconds(r["sdk_read_write_s"]), seconds(r["save_s"])] for r in graphs],
        ))
    by_dtype = {r["dtype"]: r for r in graphs}
    if {"f16", "f32"} <= by_dtype.keys():
        f16, f32 = by_dtype["f16"], by_dtype["f32"]
        print(f"f16 / f32: file {ratio(f16['file_mb'], f32['file_mb'])}, memory {ratio(f16['memory_mb'], f32['memory_mb'])}, "
              f"build time {ratio(f16['build_s'], f32['build_s'])}, "
              + ", ".join(f"ef {a['ef']}: queries/s {ratio(a['qps'], c['qps'])}, recall {a['recall']:.3f} vs {c['recall']:.3f}"
                          for a, c in zip(f16["search"], f32["search"])))
    sys.stdout.flush()


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if min(args.sizes) <= args.k:
        raise SystemExit(f"sizes must exceed k ({args.k})")
    print_header("search_speed: usearch HNSW vs exact numpy brute force", ["numpy", "usearch", "onnxruntime"])
    tmp = str(args.tmp) if args.tmp else None
    started = time.perf_counter()
    for size in args.sizes:
        for kind in args.kinds:
            base = {
                "size": size, "kind": kind, "dim": args.dim, "k": args.k, "queries": args.queries,
                "latency_queries": args.latency_queries, "query_batch": args.query_batch, "repeats": args.repeats,
                "clusters": args.clusters, "intrinsic": args.intrinsic, "noise": args.noise, "offset": args.offset, "seed": args.seed,
                "ef": args.ef, "tmp": tmp,
            }
            configs = [base | {"engine": "numpy", "dtype": "f32", "label": f"{size} {kind} numpy"}]
            configs += [base | {"engine": "usearch", "dtype": d, "label": f"{size} {kind} usearch {d}"} for d in args.dtypes]
            report([run_child(c, args.blas_threads) for c in configs])
    print(f"\ntotal {seconds(time.perf_counter() - started)}")


if __name__ == "__main__":
    main()
