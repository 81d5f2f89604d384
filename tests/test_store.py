"""The store and its readers with random vectors and no model: real SQLite, real usearch files,
real threads and a real second process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from fundus_sdk.errors import CaseIndexError
from fundus_sdk.reader import Reader
from fundus_sdk.records import Change
from fundus_sdk.store import Store, VectorSpec
from fundus_sdk.vectors import Settings
from tests.shared import REPO

DIM = 32
SPEC = VectorSpec(DIM, "f" * 64, "toy")


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows(vecs: np.ndarray, first: int = 0, **meta: object) -> list[tuple]:
    """Rows to insert: (position, path, sha256, grade, metadata JSON, vector)."""
    return [(i, f"/photos/{first + i}.jpg", f"{first + i:064x}", (first + i) % 5, json.dumps(meta), v) for i, v in enumerate(vecs)]


def test_a_store_needs_no_model_and_keeps_its_records(tmp_path):
    store = Store.create(tmp_path / "s", SPEC, dtype="f32", settings=Settings(log_limit=3))
    vecs = unit(12, 0)
    keys = [k for _, k in store.insert(rows(vecs[:10], eye="left"))]
    assert keys == list(range(1, 11)) and len(store) == 10 and store.generation == 1
    assert store.insert(rows(vecs[:1])) == [(0, 1)]  # a photo it holds keeps its key
    assert store.remove([3, 99]) == 1
    store.update(4, 2, {"note": "re-graded"}, [])
    assert [(c.field, c.old, c.new) for c in store.history(4)] == [("grade", 3, 2), ("note", None, "re-graded")]
    assert [c.field for c in store.history(3)] == ["case"]
    with Reader.open(tmp_path / "s") as reader:
        (hits,) = reader.search(vecs[5:6], 3)
        assert hits[0].key == 6 and hits[0].path == "/photos/5.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [c.key for c in reader.cases(after=4, limit=3)] == [5, 6, 7] and reader.cases(after=2**70) == []
        assert [c.key for c in reader.cases(after=-(2**70), limit=2)] == [1, 2] and len(reader.cases(after=8, limit=2**70)) == 2
        assert reader.key_of(2**70) is None and reader.history(2**70) == []  # beyond SQLite's integers: no such case
        assert sorted(h.key for h in reader.search(vecs[2:3], 20, where={"grade": [2]})[0]) == [4, 8]  # 3 gone, 4 re-graded
        assert reader.check()["ok"] and reader.settings.log_limit == 3
    store.close()


def test_a_reader_cannot_write_and_a_store_records_what_it_is_told(tmp_path):
    Store.create(tmp_path / "s", SPEC).close()
    with Reader.open(tmp_path / "s") as reader:
        assert not hasattr(reader, "insert") and reader.read_only
    with Store.open(tmp_path / "s") as store:
        store.record([Change(7, "2026-01-01T00:00:00Z", "grade", 1, 2)])
        assert store.history(7)[0].new == 2
    with pytest.raises(CaseIndexError, match="not a fundus-sdk index"):
        Reader.open(tmp_path)


WRITER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    from fundus_sdk.store import Store
    store = Store.open(sys.argv[1])
    for step in range(int(sys.argv[2])):
        v = np.random.default_rng(100 + step).normal(size=(40, {dim})).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        first = 10_000 * (step + 1)
        store.insert([(i, None, f"{{first + i:064x}}", 0, "{{}}", x) for i, x in enumerate(v)])
        time.sleep(0.02)
    print("done", flush=True)
    """
)


def test_threads_sharing_one_reader_get_the_serial_answer_while_another_process_commits(tmp_path):
    """8 threads search one Reader while a writer process commits 15 batches (some rewriting the
    vector file). Every answer must be the exact answer for the generation it was searched in."""
    base = unit(1500, 1)
    with Store.create(tmp_path / "s", SPEC, dtype="f32", settings=Settings(log_limit=100)) as store:
        store.insert(rows(base))
    steps = 15
    added = []  # what the writer adds, batch by batch
    for s in range(steps):
        v = np.random.default_rng(100 + s).normal(size=(40, DIM)).astype(np.float32)
        added.append(v / np.linalg.norm(v, axis=1, keepdims=True))
    queries = np.vstack([unit(8, 7), added[2][:4], added[11][:4]])  # some only match cases added later
    reader = Reader.open(tmp_path / "s")
    seen: list[tuple[int, int, list[int]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def search(t: int) -> None:
        try:
            while not stop.is_set():
                snap = reader.snapshot()
                for q, hits in enumerate(reader.search(queries, 5, snap=snap)):
                    seen.append((snap.generation, q, [h.key for h in hits]))
        except BaseException as exc:  # noqa: BLE001 (reported below, with the thread's answers)
            errors.append(exc)

    threads = [threading.Thread(target=search, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    writer = subprocess.run([sys.executable, "-c", WRITER.format(repo=str(REPO), dim=DIM), str(tmp_path / "s"), str(steps)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    for _ in range(3):  # the last commits seen too
        reader.snapshot()
    stop.set()
    for t in threads:
        t.join()
    reader.close()
    assert writer.returncode == 0, writer.stderr
    assert not errors, errors
    generations = {g for g, _, _ in seen}
    assert len(generations) >= 5 and max(generations) == 1 + steps  # the threads saw the index grow
    for generation in generations:  # generation 1 holds the base, each later one a batch more
        keys = np.concatenate([np.arange(1, 1501)] + [np.arange(1501 + 40 * s, 1541 + 40 * s) for s in range(generation - 1)])
        vectors = np.vstack([base, *added[: generation - 1]])
        expected = [keys[np.argsort(-(vectors @ q))[:5]].tolist() for q in queries]
        for g, q, got in seen:
            if g == generation:
                assert got == expected[q], (generation, q)
