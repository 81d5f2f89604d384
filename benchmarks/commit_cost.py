"""What one small change costs in a large index: commits that log the change in SQLite (the
default, Settings.log_limit) against commits that rewrite the whole vector file (log_limit 0, how
every commit worked before), and what the log costs a reader that opens the index.

Why: an index of 25,000 cases spent ~86 ms rewriting and hashing its vector file for each add of
one case. Both variants run on copies of the same index in the same minute; each add is its own
commit of one random unit vector, as `index add` of one new photo commits it.

    python -m benchmarks.commit_cost [--cases 25000 100000] [--adds 200]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fundus_sdk import Index, Settings, load_model
from fundus_sdk.store import Store
from fundus_sdk.tables import format_table

from .common import print_header, ratio


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def adds(folder: Path, n: int, fingerprint: str) -> tuple[float, float]:
    """(median, max) milliseconds of n single-vector commits into the index at `folder`."""
    rng = np.random.default_rng(1)
    times = []
    with Index.open(folder) as ix:
        for v in unit(rng, n, ix.dim):
            start = time.perf_counter()
            ix.add(v, model_fingerprint=fingerprint)
            times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times)), float(np.max(times))


def open_ms(folder: Path, repeats: int = 5) -> float:
    """Median milliseconds of a read-only open and one search."""
    times = []
    probe = unit(np.random.default_rng(2), 1, 256)[0]
    for _ in range(repeats):
        start = time.perf_counter()
        with Index.open(folder, read_only=True) as ix:
            ix.search(probe[: ix.dim], k=10)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, nargs="+", default=[25_000, 100_000], help="index sizes (default 25000 100000)")
    p.add_argument("--adds", type=int, default=200, help="single-vector commits timed per variant (default 200)")
    args = p.parse_args()
    print_header("index commits: logged change vs rewritten vector file", ["numpy", "usearch"])
    model = load_model()
    default = Settings.log_limit
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cases in args.cases:
            base = Path(tmp) / f"base-{cases}"
            # the starting point has its vectors in the file, nothing logged
            with Index.create(base, model=model, settings=Settings(log_limit=0)) as ix:
                ix.add(unit(np.random.default_rng(0), cases, model.dim), model_fingerprint=model.fingerprint)
            copies = {}
            for name, limit in (("rewrite", 0), ("log", default)):
                copies[name] = Path(tmp) / f"{name}-{cases}"
                shutil.copytree(base, copies[name])
                with Store.open(copies[name]) as store:  # the setting the index records, changed in place
                    store.set_info("log_limit", str(limit))
            rewrite = adds(copies["rewrite"], args.adds, model.fingerprint)
            logged = adds(copies["log"], args.adds, model.fingerprint)
            open_rewrite, open_logged = open_ms(copies["rewrite"]), open_ms(copies["log"])
            rows.append([cases, f"{rewrite[0]:.1f}", f"{logged[0]:.2f}", ratio(logged[0], rewrite[0]),
                         f"{rewrite[1]:.0f}", f"{logged[1]:.0f}",
                         f"{open_rewrite:.0f}", f"{open_logged:.0f}", ratio(open_logged, open_rewrite)])  # fmt: skip
            shutil.rmtree(base)
    print(f"{args.adds} commits of one vector each; log_limit {default} (the default) against 0 (rewrite every commit)")
    print(f"'open' = read-only open plus one search, with {args.adds} changes logged against none\n")
    print(format_table(["cases", "ms/add, rewrite", "ms/add, log", "add ratio", "max ms, rewrite", "max ms, log",
                        "open ms, rewrite", "open ms, log", "open ratio"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
