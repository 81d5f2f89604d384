"""Recall@10 of fundus_sdk.Index's search against exact search, and its speed against exact numpy,
at 100,000 and 1,000,000 vectors, on the two sets issue 22 names.

Why: a similar case that the search silently misses is an error for a retrieval aid. The index
searches exactly up to `Settings.exact_below` cases and through usearch's HNSW graph above, built
with `Settings.connectivity` and searched at `Settings.expansion_search` (both recorded in each
index). This measures, per connectivity and search depth, the recall@10 of usearch (f16, the
index's storage) against exact float32 search and the median time of one query against one
exact numpy query (a matrix-vector product and argpartition), in the same process and minute.

Sets:
- "clustered": 200 centres drawn from N(0, 1) per dimension, members = centre + 0.6 N(0, 1),
  queries = members + 0.3 N(0, 1), all normalised (the issue's definition);
- "photos": the embeddings of real photographs (an .npz from `fundus-sdk embed`, e.g. of
  ../shared/data/eyepacs256/images) and copies of them moved as much as augmentation moves a
  photo's embedding (--copy-cosine, measured for the bundled model), queries = fresh copies.

    fundus-sdk embed ../shared/data/eyepacs256/images -o /tmp/eyepacs.npz
    python -m benchmarks.search_recall --sizes 100000 --photos /tmp/eyepacs.npz
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fundus_sdk import Settings, read_embeddings  # imports onnxruntime before usearch (see fundus_sdk/vectors.py)
from fundus_sdk.tables import format_table
from usearch.index import Index as USearch

from .common import print_header, ratio


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, queries: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.standard_normal((200, dim), dtype=np.float32)
    members = centres[rng.integers(0, 200, n)] + np.float32(0.6) * rng.standard_normal((n, dim), dtype=np.float32)
    picked = members[rng.choice(n, queries, replace=False)]
    return unit(members), unit(picked + np.float32(0.3) * rng.standard_normal(picked.shape, dtype=np.float32))


def copies_of(photos: np.ndarray, n: int, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors, each a photo's embedding moved by isotropic noise to about `cosine` of it."""
    base = photos[rng.integers(0, len(photos), n)]
    sigma = np.sqrt((1 / cosine**2 - 1) / photos.shape[1])  # |noise|^2 = dim sigma^2 = tan^2 of the angle
    return unit(base + np.float32(sigma) * rng.standard_normal(base.shape, dtype=np.float32))


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = []
    for i in range(0, len(queries), 64):
        sims = queries[i : i + 64] @ vectors.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        out.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1), 1))
    return np.concatenate(out)


def median_ms(fn, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--photos", type=Path, help="an .npz from `fundus-sdk embed` (the 'photos' set; left out without)")
    p.add_argument("--copy-cosine", type=float, default=0.95, help="photos: cosine of a copy to its photo (default 0.95)")
    p.add_argument("--connectivity", type=int, nargs="+", default=[16, 32], help="HNSW connectivity values (default 16 32)")
    p.add_argument("--ef", type=int, nargs="+", default=[128, 256, 512], help="expansion_search values (default 128 256 512)")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall (default 1000; 100 are timed one by one)")
    p.add_argument("-k", type=int, default=10)
    args = p.parse_args()
    print_header("search recall@10 and speed: fundus_sdk.Index's usearch graph vs exact search", ["numpy", "usearch"])
    print(f"index defaults: {Settings()}\n")
    photos = read_embeddings(args.photos).vectors if args.photos else None
    rows = []
    for n in args.sizes:
        for kind in ("clustered", "photos") if photos is not None else ("clustered",):
            rng = np.random.default_rng(0)
            if kind == "clustered":
                vectors, queries = clustered(n, args.queries, 256, rng)
            else:
                vectors = copies_of(photos, n, args.copy_cosine, rng)
                queries = copies_of(photos, args.queries, args.copy_cosine, rng)
            truth = exact_top(vectors, queries, args.k)
            numpy_ms = median_ms(lambda q: np.argpartition(-(vectors @ q), args.k)[: args.k], queries[:100])
            for m in args.connectivity:
                graph = USearch(ndim=vectors.shape[1], metric="cos", dtype="f16", connectivity=m,
                                expansion_add=Settings.expansion_add)  # fmt: skip
                start = time.perf_counter()
                graph.add(np.arange(n), vectors)
                build = time.perf_counter() - start
                exact_ms = median_ms(lambda q: graph.search(q, args.k, exact=True), queries[:100])
                for ef in args.ef:
                    graph.expansion_search = ef
                    found = graph.search(queries, args.k)
                    recall = np.mean([len(set(found.keys[i]) & set(truth[i])) / args.k for i in range(len(queries))])
                    ms = median_ms(lambda q: graph.search(q, args.k), queries[:100])
                    rows.append([n, kind, m, f"{build:.0f} s", ef, f"{recall:.4f}", f"{ms:.2f}", f"{numpy_ms:.2f}",
                                 ratio(numpy_ms, ms), f"{exact_ms:.2f}"])  # fmt: skip
                    print("  " + " | ".join(map(str, rows[-1])), flush=True)
    print()
    print(format_table(["vectors", "set", "connectivity", "build", "expansion_search", "recall@10", "ms/query",
                        "numpy exact ms/query", "speed-up", "usearch exact ms/query"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
