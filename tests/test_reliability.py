"""The index under faults and company: one writer at a time, readers that see commits, damage
detected instead of trusted, a killed commit that read-only commands survive, private files."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fundus_sdk import CaseIndexError, Index, load_model
from fundus_sdk.vectors import Settings
from tests.shared import REPO, RETINA


@pytest.fixture(scope="module")
def model():
    return load_model()


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def filled(path: Path, model, n: int = 40, log_limit: int = Settings.log_limit, **settings: float) -> np.ndarray:
    """An index of n random vectors; log_limit=0 writes them to the vector file (else they stay logged)."""
    vectors = unit(n, model.dim)
    with Index.create(path, model=model, settings=Settings(log_limit=log_limit, **settings)) as ix:
        ix.add(vectors, [{"grade": i % 5} for i in range(n)], model_fingerprint=model.fingerprint)
    return vectors


def python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, **kwargs)


def test_a_second_writer_waits_then_fails_naming_the_holder(tmp_path, model):
    filled(tmp_path / "cases", model, 4, lock_timeout=0.5)
    holder = python(f"""
        import time
        from fundus_sdk.store import Store
        with Store.open({str(tmp_path / "cases")!r}).writer():
            print("locked", flush=True)
            time.sleep(6)
    """, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with Index.open(tmp_path / "cases", model=model) as ix:
        started = time.monotonic()
        with pytest.raises(CaseIndexError, match=rf"another writer holds the index \(pid {holder.pid} "):
            ix.add(unit(1, model.dim, seed=9), model_fingerprint=model.fingerprint)
        assert time.monotonic() - started >= 0.5
        assert len(ix) == 4
    holder.kill()
    holder.wait()
    with Index.open(tmp_path / "cases", model=model) as ix:  # the lock dies with its holder
        ix.add(unit(1, model.dim, seed=9), model_fingerprint=model.fingerprint)
        assert len(ix) == 5


def test_writers_never_save_from_a_stale_view(tmp_path, model):
    vectors = filled(tmp_path / "cases", model, 10)
    a = Index.open(tmp_path / "cases", model=model)
    b = Index.open(tmp_path / "cases", model=model)
    (key,) = b.add(unit(1, model.dim, seed=5), model_fingerprint=model.fingerprint)
    a.remove([1])  # a's view predates b's add: it must not drop b's vector when it saves
    with Index.open(tmp_path / "cases", read_only=True) as ro:
        assert len(ro) == 10 and ro.check()["ok"]
        assert ro.search(unit(1, model.dim, seed=5)[0], k=1)[0].key == key
        assert ro.search(vectors[1], k=1)[0].key != 1
    a.close()
    b.close()


def test_a_long_lived_reader_sees_later_commits(tmp_path, model):
    filled(tmp_path / "cases", model, 10)
    with Index.open(tmp_path / "cases", read_only=True) as reader, Index.open(tmp_path / "cases", model=model) as writer:
        new = unit(3, model.dim, seed=7)
        keys = writer.add(new, model_fingerprint=model.fingerprint)
        assert [reader.search(v, k=1)[0].key for v in new] == keys
        assert len(reader.search(new[0], k=20)) == 13


def test_a_vector_file_with_flipped_bytes_is_detected_and_rebuilt(tmp_path, model):
    vectors = filled(tmp_path / "cases", model, 40, log_limit=0)
    (file,) = (tmp_path / "cases").glob("vectors-*.usearch")
    data = bytearray(file.read_bytes())
    for i in range(len(data) - 4000, len(data) - 100, 7):  # same size, damaged vectors
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum differs"), Index.open(tmp_path / "cases", read_only=True) as ro:
        assert ro.check()["checksum"] == "differs"
        assert [ro.search(v, k=1)[0].key for v in vectors] == list(range(1, 41))


def test_a_damaged_row_is_quarantined_not_fatal(tmp_path, model):
    vectors = filled(tmp_path / "cases", model, 10, log_limit=0)
    db = sqlite3.connect(tmp_path / "cases" / "cases.sqlite")
    db.execute("UPDATE cases SET vector = x'0000' WHERE key = 3")
    db.commit()
    db.close()
    for f in (tmp_path / "cases").glob("vectors-*.usearch"):
        f.unlink()  # forces a rebuild from SQLite
    with pytest.warns(UserWarning, match=r"case\(s\) 3 have a damaged stored vector"):
        ix = Index.open(tmp_path / "cases", model=model)
    with ix:
        assert ix.search(vectors[5], k=1)[0].key == 6
        assert ix.check()["damaged_rows"] == [3]


def test_a_commit_killed_midway_leaves_an_index_read_only_commands_open(tmp_path, model):
    filled(tmp_path / "cases", model, 200)
    killer = python(f"""
        import os, sqlite3
        c = sqlite3.connect({str(tmp_path / "cases" / "cases.sqlite")!r}, isolation_level=None)
        c.execute("PRAGMA cache_size=1")
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE cases SET meta = '{{\\"x\\": 1}}'")
        os._exit(9)
    """)
    killer.wait()
    assert (tmp_path / "cases" / "cases.sqlite-journal").exists()  # a hot journal, as a kill leaves it
    with Index.open(tmp_path / "cases", read_only=True) as ro:
        assert len(ro) == 200 and all(c.metadata == {} for c in ro)  # the unfinished change rolled back
    proc = subprocess.run([sys.executable, "-m", "fundus_sdk", "index", "info", str(tmp_path / "cases")],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_a_leftover_of_an_interrupted_create_does_not_block_creating_again(tmp_path, model):
    (tmp_path / ".cases.creating-99999").mkdir()  # what a kill during creation leaves: no index at the path
    (tmp_path / ".cases.creating-99999" / "cases.sqlite").write_bytes(b"")
    assert not (tmp_path / "cases").exists()
    with Index.create(tmp_path / "cases", model=model) as ix:
        assert len(ix) == 0


def test_index_files_are_readable_by_their_owner_only(tmp_path, model):
    filled(tmp_path / "cases", model, 3)
    assert stat.S_IMODE((tmp_path / "cases").stat().st_mode) == 0o700
    for f in (tmp_path / "cases").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name


def test_check_reports_and_repair_fixes(tmp_path, model):
    filled(tmp_path / "cases", model, 10, log_limit=0)
    (file,) = (tmp_path / "cases").glob("vectors-*.usearch")
    file.write_bytes(file.read_bytes()[:-50])
    (tmp_path / "cases" / ".vectors-7.usearch.4242.tmp").write_bytes(b"half")
    proc = subprocess.run([sys.executable, "-m", "fundus_sdk", "index", "check", str(tmp_path / "cases")],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert proc.returncode == 1 and "differs" in proc.stdout and ".vectors-7.usearch.4242.tmp" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "fundus_sdk", "index", "check", str(tmp_path / "cases"), "--repair"],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with Index.open(tmp_path / "cases", read_only=True) as ro:
        assert ro.check()["ok"]


def test_a_bad_path_in_a_batch_is_one_failure_and_the_rest_is_done(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    proc = subprocess.run(
        [sys.executable, "-m", "fundus_sdk", "embed", str(RETINA), str(tmp_path / "gone.jpg"), str(tmp_path / "loop.jpg"),
         str(tmp_path / "missing.jpg"), "-o", str(tmp_path / "e.npz")],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "embedded 1 images, 3 failed" in proc.stdout
    assert "gone.jpg: dangling symbolic link" in proc.stderr and "loop.jpg: symbolic link loop" in proc.stderr
    assert "missing.jpg: no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_a_strip_is_not_a_photo():
    from fundus_sdk import ImageError, decode

    with pytest.raises(ImageError, match="20000x100 pixels, too elongated"):
        decode(np.zeros((100, 20000, 3), np.uint8))


WRITER = """
import sys, numpy as np
from fundus_sdk import Index, load_model
path, seed, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = load_model()
rng = np.random.default_rng(1000 + seed)  # not filled()'s seed 0: its vectors would come again, tied with theirs
with Index.open(path, model=model) as ix:
    for r in range(rounds):
        v = rng.normal(size=(3, model.dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        keys = ix.add(v, model_fingerprint=model.fingerprint)
        np.save(f"{path}/../confirmed-{seed}-{r}.npy", v)  # only once add() has returned
        print(*keys, flush=True)
        if r % 4 == 3:
            ix.remove([keys[0]])
            print("removed", keys[0], flush=True)
"""

READER = """
import sys, numpy as np
from fundus_sdk import Index
with Index.open(sys.argv[1], read_only=True) as ix:
    for _ in range(int(sys.argv[2])):
        v = np.random.default_rng(0).normal(size=ix.dim).astype(np.float32)
        ix.search(v / np.linalg.norm(v), k=5)
print("reader done", flush=True)
"""


@pytest.mark.slow
def test_soak_writers_readers_and_a_killer_on_one_index(tmp_path, model):
    """Three writers, two readers and kill -9 of one writer, for a fixed number of rounds:
    afterwards every confirmed add is found, every confirmed remove is gone, rows == vectors."""
    index = tmp_path / "soak" / "cases"
    index.parent.mkdir()
    filled(index, model, 5)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(index), str(s), rounds], cwd=REPO,
                                stdout=subprocess.PIPE, text=True) for s, rounds in enumerate(["12", "12", "2000"])]  # fmt: skip
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(index), "150"], cwd=REPO,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    victim = writers[2]
    first = victim.stdout.readline()  # it has committed at least once
    time.sleep(0.3)
    victim.kill()
    outputs = {2: first + victim.communicate()[0]} | {s: w.communicate(timeout=240)[0] for s, w in enumerate(writers[:2])}
    assert [w.returncode for w in writers] == [0, 0, -9]  # the victim died mid-run
    assert all(r.communicate(timeout=240)[0].strip() == "reader done" for r in readers)
    confirmed, removed = {}, set()  # (writer, round) -> keys printed once add() returned
    for seed, out in outputs.items():
        rounds = [line.split() for line in out.splitlines()]
        removed |= {int(r[1]) for r in rounds if r[0] == "removed"}
        for i, keys in enumerate(r for r in rounds if r[0] != "removed"):
            confirmed[seed, i] = [int(k) for k in keys]
    assert len(confirmed) >= 25 and removed
    last = max(r for s, r in confirmed if s == 2)  # the victim may have died between a remove and its report
    unsure = {confirmed[2, last][0]} if last % 4 == 3 else set()
    with Index.open(index, read_only=True) as ro:
        report = ro.check()
        assert report["ok"] and report["rows"] == report["vectors"], report
        assert not {c.key for c in ro} & removed
        for (seed, r), keys in confirmed.items():
            for v, key in zip(np.load(index.parent / f"confirmed-{seed}-{r}.npy"), keys):
                if key not in removed | unsure:
                    assert ro.search(v, k=1)[0].key == key


def test_a_commit_logs_its_change_instead_of_rewriting_the_vector_file(tmp_path, model):
    vectors = filled(tmp_path / "cases", model, 30, log_limit=4)  # the 30 added at once are written to the file
    (file,) = (tmp_path / "cases").glob("vectors-*.usearch")
    written = file.read_bytes()
    reader = Index.open(tmp_path / "cases", read_only=True)  # memory-maps the file: it cannot take changes in place
    with Index.open(tmp_path / "cases", model=model) as writer:
        added = unit(2, model.dim, seed=3)
        keys = writer.add(added, model_fingerprint=model.fingerprint)
        writer.remove([5])
        assert list((tmp_path / "cases").glob("vectors-*.usearch")) == [file] and file.read_bytes() == written
        assert writer.check()["logged_changes"] == 3
        assert [reader.search(v, k=1)[0].key for v in added] == keys  # the reader applies the log
        assert reader.search(vectors[4], k=1)[0].key != 5 and len(reader.search(vectors[0], k=50)) == 31
        more = unit(2, model.dim, seed=4)
        more_keys = writer.add(more, model_fingerprint=model.fingerprint)  # 5 logged > 4: the file is rewritten
        report = writer.check()
        assert report["ok"] and report["logged_changes"] == 0 and not file.exists()
    assert [reader.search(v, k=1)[0].key for v in more] == more_keys
    reader.close()
    with Index.open(tmp_path / "cases", read_only=True) as ro:
        assert len(ro) == 33 and ro.check()["ok"]
        assert [ro.search(v, k=1)[0].key for v in np.vstack([added, more])] == keys + more_keys


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
if sys.argv[2] == "api":  # every commit writes the vector file: the failure lands in that write
    import numpy as np
    from fundus_sdk import Index
    with Index.open(sys.argv[3]) as ix:
        v = np.random.default_rng(5).normal(size=(1, ix.dim)).astype(np.float32)
        try:
            ix.add(v / np.linalg.norm(v), model_fingerprint=ix.model_fingerprint)
        except OSError as exc:
            sys.exit(f"OSError: {exc}")
else:
    from fundus_sdk.cli import main
    main(sys.argv[2:], prog_name="fundus-sdk")
"""


def full_disk(limit: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), *args], cwd=REPO, capture_output=True, text=True)


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path, model):
    cases = tmp_path / "cases"
    vectors = filled(cases, model, 300, log_limit=0)
    before = sorted(p.name for p in cases.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    np.savez(out / "more.npz", vectors=unit(50, model.dim, seed=8), paths=np.array([f"p{i}.jpg" for i in range(50)]),
             sha256=np.array([f"{i:064x}" for i in range(50)]), model_fingerprint=np.array(model.fingerprint))  # fmt: skip
    size = (cases / "cases.sqlite").stat().st_size
    runs = {
        "commit": full_disk(size, "index", "add", str(cases), str(out / "more.npz"), "--allow-unlabelled"),
        "vectors": full_disk(100_000, "api", str(cases)),  # the vector file of 300 cases is larger
        "embed": full_disk(1_000, "embed", str(RETINA), "-o", str(out / "v.npz")),
    }
    for name, proc in runs.items():
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
    assert runs["commit"].returncode == 3 and f"{cases}: the change could not be committed" in runs["commit"].stderr
    assert "cannot write the vector file" in runs["vectors"].stderr
    assert runs["embed"].returncode == 3 and "v.npz" in runs["embed"].stderr
    assert sorted(p.name for p in out.iterdir()) == ["more.npz"]  # no partial output
    assert sorted(p.name for p in cases.iterdir() if p.name != "cases.sqlite-journal") == before
    with Index.open(cases, read_only=True) as ro:
        assert len(ro) == 300 and ro.check()["ok"]
        assert ro.search(vectors[7], k=1)[0].key == 8


def test_damaged_database_pages_are_one_line_naming_the_index(tmp_path, model):
    filled(tmp_path / "cases", model, 300)
    db = tmp_path / "cases" / "cases.sqlite"
    data = bytearray(db.read_bytes())
    for page in range(len(data) // 3 // 4096, len(data) // 3 // 4096 + 10):  # ten pages of rows overwritten
        data[page * 4096 : (page + 1) * 4096] = np.random.default_rng(page).bytes(4096)
    db.write_bytes(bytes(data))
    for command in (["index", "info"], ["index", "check"], ["index", "export", "-o", str(tmp_path / "x.csv")]):
        proc = subprocess.run([sys.executable, "-m", "fundus_sdk", *command[:2], str(tmp_path / "cases"), *command[2:]],
                              capture_output=True, text=True, cwd=REPO)  # fmt: skip
        assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
        assert f"error: {tmp_path / 'cases'}: cannot read cases.sqlite (database disk image is malformed)" in proc.stderr


def test_a_batch_search_finds_what_one_query_at_a_time_finds(tmp_path, model):
    vectors = filled(tmp_path / "cases", model, 60, log_limit=0)
    queries = unit(7, model.dim, seed=11)
    with Index.open(tmp_path / "cases", model=model) as writer:
        writer.add(unit(5, model.dim, seed=12), model_fingerprint=model.fingerprint)  # logged, not in the file
        writer.remove([3])
        with Index.open(tmp_path / "cases", read_only=True) as reader:
            for ix in (writer, reader):
                batch = ix.search_batch(queries, k=8)
                assert [[h.key for h in hits] for hits in batch] == [[h.key for h in ix.search(q, k=8)] for q in queries]
                assert all(len(hits) == 8 and 3 not in {h.key for h in hits} for hits in batch)
            assert [hits[0].key for hits in reader.search_batch(vectors[:4], k=1)][:2] == [1, 2]


def test_removals_past_the_log_limit_leave_an_index_every_process_opens(tmp_path, model):
    """Adding 2,800 cases then removing 1,300 commits past the log limit: the vector file written
    then must be one usearch reads back (a file with removed slots aborts the process)."""
    vectors = filled(tmp_path / "cases", model, 2800)
    with Index.open(tmp_path / "cases", model=model) as ix:
        assert ix.remove(list(range(1, 1301))) == 1300
    opener = [sys.executable, "-c", "import sys; from fundus_sdk import Index; ix = Index.open(sys.argv[1], read_only=True); "
              "print(len(ix), ix.check()['ok'])", str(tmp_path / "cases")]  # fmt: skip
    proc = subprocess.run(opener, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.split() == ["1500", "True"], proc.stderr[-2000:]
    with Index.open(tmp_path / "cases", read_only=True) as ro:
        assert ro.search(vectors[2000], k=1)[0].key == 2001


def test_a_vector_file_with_removed_slots_is_rebuilt_not_restored(tmp_path, model):
    """A file an earlier version wrote with removed slots is rebuilt from SQLite, not handed to usearch."""
    from usearch.index import Index as USearch

    vectors = filled(tmp_path / "cases", model, 30, log_limit=4)  # the 30 added at once are written to the file
    (file,) = (tmp_path / "cases").glob("vectors-*.usearch")
    damaged = USearch(ndim=model.dim, metric="cos", dtype="f16")
    damaged.add(np.arange(1, 31, dtype=np.uint64), vectors)
    damaged.remove(np.arange(1, 11, dtype=np.uint64))
    damaged.save(str(file))
    db = sqlite3.connect(tmp_path / "cases" / "cases.sqlite")
    db.execute("DELETE FROM info WHERE name = 'vectors_sha256'")  # as an index from before checksums
    db.commit()
    db.close()
    code = f"""
        import warnings
        from fundus_sdk import Index
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ix = Index.open({str(tmp_path / "cases")!r}, read_only=True)
        print(len(ix), any("removed vectors" in str(w.message) for w in caught))
    """
    proc = python(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    assert proc.returncode == 0 and out.split() == ["30", "True"], err[-2000:]
    with pytest.warns(UserWarning, match="removed vectors"), Index.open(tmp_path / "cases", read_only=True) as ro:
        assert [ro.search(v, k=1)[0].key for v in vectors] == list(range(1, 31))


def test_a_stored_vector_with_a_flipped_exponent_is_left_out_and_reported(tmp_path, model):
    vectors = filled(tmp_path / "cases", model, 20, log_limit=0)
    db = sqlite3.connect(tmp_path / "cases" / "cases.sqlite")
    blob = bytearray(db.execute("SELECT vector FROM cases WHERE key = 7").fetchone()[0])
    blob[4 * 5 + 3] ^= 0x40  # the exponent byte of component 5: a huge or tiny value, same length
    db.execute("UPDATE cases SET vector = ? WHERE key = 7", (bytes(blob),))
    db.commit()
    db.close()
    with Index.open(tmp_path / "cases", read_only=True) as ro:
        report = ro.check()
        assert report["damaged_rows"] == [7] and not report["ok"]
    for f in (tmp_path / "cases").glob("vectors-*.usearch"):
        f.unlink()  # a rebuild must not copy the damaged row on
    with pytest.warns(UserWarning, match=r"case\(s\) 7 have a damaged stored vector"):
        ix = Index.open(tmp_path / "cases", model=model)
    with ix:
        hits = ix.search(vectors[3], k=20)
        assert 7 not in [h.key for h in hits] and all(-1.0 <= h.score <= 1.0 + 1e-6 for h in hits)


@pytest.fixture(scope="module")
def four_photos() -> list[Path]:
    from tests.shared import eyepacs_sample

    return [p for p, _ in eyepacs_sample(4)]


def test_a_photo_replaced_between_hashing_and_decoding_is_never_stored_under_the_old_identity(
    tmp_path, model, four_photos, monkeypatch
):
    import fundus_sdk.pipeline as pipeline
    from fundus_sdk.vectors import file_sha256

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(four_photos[0].read_bytes())
    real_identify = pipeline.identify

    def identify_then_replace(item):  # another process copies a photo over the file right after hashing
        found = real_identify(item)
        photo.write_bytes(four_photos[1].read_bytes())
        return found

    monkeypatch.setattr(pipeline, "identify", identify_then_replace)
    errors = []
    with Index.create(tmp_path / "cases", model=model) as ix:
        assert ix.add([photo], on_error=errors.append) == [None]
        assert "changed while it was being added" in str(errors[0]) and str(photo) in str(errors[0])
        assert len(ix) == 0
        monkeypatch.setattr(pipeline, "identify", real_identify)
        (key,) = ix.add([photo])  # the photo now at the path, under its own identity
        assert ix.get(key).sha256 == file_sha256(four_photos[1])


def test_a_rebuild_killed_midway_leaves_nothing_at_the_new_path_and_a_rerun_completes(tmp_path, model, four_photos):
    with Index.create(tmp_path / "old", model=model) as ix:
        ix.add(four_photos, [{"grade": g} for g in range(4)])
        ix.update(1, {"grade": 3})
    killer = python(f"""
        import os
        from fundus_sdk import rebuild
        rebuild({str(tmp_path / "old")!r}, {str(tmp_path / "new")!r}, batch_size=2, progress=lambda n: os._exit(9))
    """)
    assert killer.wait() == 9
    assert not (tmp_path / "new").exists()
    from fundus_sdk import rebuild

    report = rebuild(tmp_path / "old", tmp_path / "new", model=model)
    assert report.path == tmp_path / "new" and report.rebuilt == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]  # the killed run's leftovers cleared
    with Index.open(tmp_path / "new", read_only=True) as new:
        assert len(new) == 4 and [(c.field, c.old, c.new) for c in new.history(1)] == [("grade", 0, 3)]


def tampered(model, tmp_path: Path, change) -> Path:
    """The model's file with `change(proto)` applied and its metadata (the weights' fingerprint too) kept."""
    import onnx

    proto = onnx.load(str(model.path))
    change(proto)
    out = tmp_path / "tampered.onnx"
    onnx.save(proto, str(out))
    return out


def relu_for_clip(proto) -> None:
    for node in proto.graph.node:
        if node.op_type == "Clip":
            node.op_type = "Relu"
            del node.input[1:]


def open_gate(proto) -> None:
    import json

    from fundus_sdk.gate import CALIBRATION_KEY

    entry = next(p for p in proto.metadata_props if p.key == CALIBRATION_KEY)
    calibration = json.loads(entry.value)
    calibration["limits"] = {name: 1e9 for name in calibration["limits"]}
    entry.value = json.dumps(calibration)


@pytest.mark.parametrize("change", [relu_for_clip, open_gate])
def test_a_model_changed_beyond_its_weights_is_not_the_index_model(tmp_path, model, change):
    from fundus_sdk import ModelMismatchError
    from fundus_sdk.model import Model

    filled(tmp_path / "cases", model, 5)
    other = Model.load(tampered(model, tmp_path, change))
    assert other.weights_fingerprint == model.weights_fingerprint and other.fingerprint != model.fingerprint
    with pytest.raises(ModelMismatchError, match="was built with model"):
        Index.open(tmp_path / "cases", model=other)
    with Index.open(tmp_path / "cases", model=model) as ix:
        with pytest.raises(ModelMismatchError):
            ix.add(unit(1, model.dim, seed=3), model_fingerprint=other.fingerprint)


def test_an_index_from_before_the_whole_fingerprint_opens_with_its_model(tmp_path, model):
    filled(tmp_path / "cases", model, 5)
    db = sqlite3.connect(tmp_path / "cases" / "cases.sqlite")  # as 0.3 wrote it: the weights' fingerprint alone
    db.execute("UPDATE info SET value = ? WHERE name = 'model_fingerprint'", (model.weights_fingerprint,))
    db.execute("DELETE FROM info WHERE name = 'model_weights'")
    db.commit()
    db.close()
    with Index.open(tmp_path / "cases", model=model) as ix:
        ix.add(unit(1, model.dim, seed=4), model_fingerprint=model.weights_fingerprint)  # an embedding file from 0.3
        assert len(ix) == 6
