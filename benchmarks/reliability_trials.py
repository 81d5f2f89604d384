"""Kill, concurrency and damage trials on one index: counts, and records lost (must be 0).

- kill: a writer adds batches of vectors and removes some (small log limit, so vector files are
  rewritten often, removals included), and is killed with SIGKILL after a random delay; every add
  it confirmed (printed after `add` returned) must then be found, every confirmed removal gone,
  and a fresh process must open the index and find it consistent (`check`).
- concurrency: writers and readers in several processes on one index for a fixed number of
  rounds; readers' searches must never fail, and every confirmed add is found afterwards.
- damage: a flipped exponent byte in a stored vector, and removed slots in a vector file, must be
  detected (left out, rebuilt), never served.

Usage: python -m benchmarks.reliability_trials [--kills 20] [--writers 3] [--readers 3] [--rounds 40]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np

from fundus_sdk import Index, Settings, load_model

WRITERS = Settings(log_limit=40)  # the trial indexes rewrite the vector file every few commits, removals included

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from fundus_sdk import Index, load_model
    path, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model = load_model()
    rng = np.random.default_rng(1000 + seed)
    with Index.open(path, model=model) as ix:
        for r in range(rounds):
            v = rng.normal(size=(8, model.dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            keys = ix.add(v, model_fingerprint=model.fingerprint)
            np.save(f"{path}.confirmed-{seed}-{r}.npy", v)
            print("added", *keys, flush=True)
            ix.remove(keys[:3])
            print("removed", *keys[:3], flush=True)
""")

READER = textwrap.dedent("""
    import sys, numpy as np
    from fundus_sdk import Index
    rng = np.random.default_rng(int(sys.argv[3]))
    with Index.open(sys.argv[1], read_only=True) as ix:
        for _ in range(int(sys.argv[2])):
            v = rng.normal(size=ix.dim).astype(np.float32)
            ix.search(v / np.linalg.norm(v), k=5)
    print("reader done", sys.argv[2], flush=True)
""")


def start(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)


def lost_records(index: Path, outputs: dict[int, str]) -> tuple[int, int, int]:
    """(confirmed adds, confirmed removals, records lost): what the writers confirmed against the index."""
    confirmed, removed, lost = 0, set(), 0
    with Index.open(index, read_only=True) as ro:
        if not ro.check()["ok"]:
            return 0, 0, -1
        held = {c.key for c in ro}
        unsure: set[int] = set()  # a writer killed after an add, during its removal: those keys may be gone
        for seed, out in outputs.items():
            lines = [line.split() for line in out.splitlines() if line.strip()]
            removed |= {int(k) for line in lines if line[0] == "removed" for k in line[1:]}
            if lines and lines[-1][0] == "added":
                unsure |= {int(k) for k in lines[-1][1:4]}
            for r, line in enumerate(x for x in lines if x[0] == "added"):
                keys = [int(k) for k in line[1:]]
                confirmed += len(keys)
                vectors = np.load(f"{index}.confirmed-{seed}-{r}.npy")
                for key, v in zip(keys, vectors):
                    if key in removed or key in unsure:
                        continue
                    lost += key not in held or ro.search(v, k=1)[0].key != key
        lost += len(removed & held)
    return confirmed, len(removed), lost


def kill_trials(root: Path, model, trials: int) -> None:
    rng = random.Random(0)
    totals = np.zeros(3, int)
    for t in range(trials):
        index = root / f"kill-{t}"
        Index.create(index, model=model, settings=WRITERS).close()
        writer = start(WRITER, index, 0, 10_000)
        first = writer.stdout.readline()  # it has committed once
        time.sleep(rng.uniform(0.05, 2.0))
        writer.kill()
        out = first + writer.communicate()[0]
        totals += lost_records(index, {0: out})
    print(f"kill trials: {trials} writers killed (SIGKILL at 0.05-2 s), {totals[0]} adds and {totals[1]} removals "
          f"confirmed, records lost: {totals[2]}")


def concurrency_trial(root: Path, model, writers: int, readers: int, rounds: int) -> None:
    index = root / "concurrent"
    Index.create(index, model=model, settings=WRITERS).close()
    procs = [start(WRITER, index, s, rounds) for s in range(writers)]
    searches = rounds * 25
    reading = [start(READER, index, searches, s) for s in range(readers)]
    outputs = {s: p.communicate(timeout=900)[0] for s, p in enumerate(procs)}
    done = sum(r.communicate(timeout=900)[0].startswith("reader done") for r in reading)
    confirmed, removed, lost = lost_records(index, outputs)
    print(f"concurrency: {writers} writers x {rounds} rounds, {readers} readers x {searches} searches "
          f"({done} of {readers} finished without an error): {confirmed} adds and {removed} removals confirmed, "
          f"records lost: {lost}")


def damage_trials(root: Path, model) -> None:
    from usearch.index import Index as USearch

    rng = np.random.default_rng(0)
    served, detected = 0, 0
    for t in range(20):  # a flipped exponent byte in one stored vector
        index = root / f"damage-{t}"
        with Index.create(index, model=model) as ix:
            v = rng.normal(size=(50, model.dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            ix.add(v, model_fingerprint=model.fingerprint)
        victim = int(rng.integers(1, 51))
        db = sqlite3.connect(index / "cases.sqlite")
        blob = bytearray(db.execute("SELECT vector FROM cases WHERE key = ?", (victim,)).fetchone()[0])
        blob[4 * int(rng.integers(model.dim)) + 3] ^= 0x40
        db.execute("UPDATE cases SET vector = ? WHERE key = ?", (bytes(blob), victim))
        db.commit()
        db.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Index.open(index, read_only=True) as ro:
                detected += victim in ro.check()["damaged_rows"]
                served += any(h.score > 1.001 or h.key == victim for q in v for h in ro.search(q, k=3))
    print(f"damage: 20 stored vectors with a flipped exponent byte: {detected} detected by check, {served} served")
    index = root / "slots"
    with Index.create(index, model=model, settings=Settings(log_limit=0)) as ix:  # the vectors go to a vector file at once
        v = rng.normal(size=(200, model.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ix.add(v, model_fingerprint=model.fingerprint)
    (file,) = index.glob("vectors-*.usearch")
    bad = USearch(ndim=model.dim, metric="cos", dtype="f16")
    bad.add(np.arange(1, 201, dtype=np.uint64), v)
    bad.remove(np.arange(1, 51, dtype=np.uint64))
    bad.save(str(file))
    proc = subprocess.run([sys.executable, "-c", "import sys; from fundus_sdk import Index; "
                           "print(len(Index.open(sys.argv[1], read_only=True)))", str(index)],
                          capture_output=True, text=True)  # fmt: skip
    print(f"damage: a vector file with 50 removed slots: a new process opened the index (exit {proc.returncode}, "
          f"{proc.stdout.strip() or '?'} cases)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    model = load_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kill_trials(root, model, args.kills)
        concurrency_trial(root, model, args.writers, args.readers, args.rounds)
        damage_trials(root, model)


if __name__ == "__main__":
    main()
