"""Embedding an archive on a real local Ray cluster (2 CPUs): the same vectors as `embed`, bad files
as error rows, a killed worker retried without loss or duplicates, re-runs, and `index add`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fundus_sdk
from fundus_sdk.errors import Exit
from tests.shared import FIXTURES, eyepacs_sample, require

ray = require("ray", extra="ray")
pq = require("pyarrow.parquet", extra="ray")

from fundus_sdk.cluster import ClusterError, embed_on_ray, list_photos, read_shards  # noqa: E402
from fundus_sdk.embeddings import SHARD_FINGERPRINT  # noqa: E402

pytestmark = pytest.mark.slow  # starts a local Ray cluster: the full suite's tier (pytest -m 'not slow' leaves it out)


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, eyepacs_dir) -> Path:
    """12 EyePACS photos in two folders, a truncated JPEG, a cat, and a note that is no photo."""
    root = tmp_path_factory.mktemp("archive")
    for i, (photo, _) in enumerate(eyepacs_sample(12, split="test")):
        (root / f"clinic{i % 2}").mkdir(exist_ok=True)
        shutil.copy(photo, root / f"clinic{i % 2}" / photo.name)
    (root / "clinic0" / "broken.jpg").write_bytes((FIXTURES / "retina.jpg").read_bytes()[:3000])
    shutil.copy(FIXTURES / "chelsea.jpg", root / "clinic1" / "cat.jpg")
    (root / "notes.txt").write_text("not a photo")
    return root


def rows(out: Path) -> dict[str, list]:
    tables = [pq.read_table(f) for f in sorted(out.glob("*.parquet"))]
    return {k: sum((t.column(k).to_pylist() for t in tables), []) for k in tables[0].column_names}


def test_vectors_equal_embed_and_bad_files_are_rows(archive, tmp_path):
    out = tmp_path / "shards"
    report = embed_on_ray(archive, out, batch_size=4)
    assert (report.listed, report.embedded, report.failed, report.skipped) == (14, 14, 1, 0)
    got = rows(out)
    assert len(got["path"]) == len(set(got["path"])) == 14 and not any(p.endswith("notes.txt") for p in got["path"])
    by_path = dict(zip(got["path"], zip(got["vector"], got["error"], got["verdict"], got["sha256"])))
    broken = by_path[str(archive / "clinic0" / "broken.jpg")]
    assert broken[0] is None and "truncated" in broken[1]
    photos = [p for p, (v, e, _, _) in by_path.items() if e is None]
    vectors = np.array([by_path[p][0] for p in photos], np.float32)
    expected = fundus_sdk.embed(photos)
    assert (vectors * expected).sum(axis=1).min() >= 0.9999
    cat = by_path[str(archive / "clinic1" / "cat.jpg")]
    assert '"fundus": false' in cat[2] and cat[0] is not None  # embedded, and judged: index add refuses it
    assert by_path[photos[0]][3] == fundus_sdk.decode(photos[0]).sha256
    model = fundus_sdk.load_model()
    for f in out.glob("*.parquet"):
        assert pq.read_schema(f).metadata[SHARD_FINGERPRINT].decode() == model.fingerprint

    again = embed_on_ray(archive, out, batch_size=4)  # a re-run: nothing new to do
    assert (again.skipped, again.embedded) == (14, 0) and len(rows(out)["path"]) == 14


def test_a_killed_worker_is_retried_and_nothing_is_lost_or_doubled(archive, tmp_path):
    """Kill -9 the model actor's process mid-run: Ray restarts it and retries its batches."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo, _ in eyepacs_sample(40, split="train"):
        (photos / photo.name).symlink_to(photo)
    out = tmp_path / "shards"
    before = set(actor_processes("_Embedder"))  # actors of earlier runs, ending
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid in set(actor_processes("_Embedder")) - before:
                time.sleep(0.5)  # into its first batches
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(time.monotonic())
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    report = embed_on_ray(photos, out, batch_size=1)
    finished = time.monotonic()
    thread.join()
    assert killed and killed[0] < finished, "the model actor was not killed while the run was going"
    got = rows(out)
    assert len(got["path"]) == len(set(got["path"])) == report.listed == 40  # none lost, none twice
    assert all(e is None for e in got["error"]) and all(v is not None for v in got["vector"])


def actor_processes(name: str) -> list[int]:
    """Pids of Ray worker processes running an actor whose title names `name` (ray::MapWorker(...))."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and name in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            pass  # the process ended meanwhile
    return [p for p in pids if p != os.getpid()]


def test_a_pool_that_leaves_no_cpu_for_decoding_is_refused(archive, tmp_path):
    with pytest.raises(ClusterError, match="leave none for reading and decoding"):
        embed_on_ray(archive, tmp_path / "out", actors=1, threads=2)  # 2 CPUs: it would wait forever


def test_shards_from_another_model_are_refused(archive, tmp_path):
    out = tmp_path / "shards"
    embed_on_ray([archive / "clinic0"], out)
    for shard in out.glob("*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.replace_schema_metadata({SHARD_FINGERPRINT: b"0" * 64}), shard)
    with pytest.raises(ClusterError, match="another model"):
        embed_on_ray([archive / "clinic1"], out)
    fundus_sdk.Index.create(tmp_path / "ix").close()
    done = subprocess.run([sys.executable, "-m", "fundus_sdk", "index", "add", str(tmp_path / "ix"), str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == Exit.FATAL and "000000000000" in done.stderr, done.stderr


def test_cli_on_the_running_cluster_then_index_add(archive, tmp_path):
    out = tmp_path / "shards"
    cli = [sys.executable, "-m", "fundus_sdk"]
    done = subprocess.run([*cli, "embed", "--ray", "auto", str(archive), "-o", str(out), "-q"], capture_output=True, text=True)
    assert done.returncode == Exit.PARTIAL, done.stderr  # the truncated file
    assert "embedded 14 photos on Ray (1 failed" in done.stdout
    ix = tmp_path / "cases"
    fundus_sdk.Index.create(ix).close()
    added = subprocess.run([*cli, "index", "add", str(ix), str(out)], capture_output=True, text=True)
    assert added.returncode == Exit.PARTIAL, added.stderr
    assert "broken.jpg: corrupt or truncated" in added.stderr and "cat.jpg: not a fundus photograph" in added.stderr
    with fundus_sdk.Index.open(ix, read_only=True) as index:
        assert len(index) == 12
        case = next(iter(index))
        assert 0 <= case.metadata["gradability"] <= 1
        (hit,) = index.search(case.path, k=1)
        assert hit.key == case.key and hit.score > 0.999  # the shard's vector is the photo's


def test_a_parquet_file_of_something_else_is_a_clear_error(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "other.parquet")
    with pytest.raises(fundus_sdk.embeddings.EmbeddingFileError, match="other.parquet: not a shard written by"):
        fundus_sdk.read_embeddings(tmp_path)


def test_listing(archive):
    found = list_photos(str(archive))
    assert len(found) == 14 and all(not f.endswith(".txt") for f in found)
    with pytest.raises(ClusterError, match="no such file"):
        list_photos(str(archive / "missing"))
    assert read_shards(str(archive / "nothing-here")).paths == set()
    # `--ray PATH`: a path right after --ray is a photo source, not a cluster address
    cli = [sys.executable, "-m", "fundus_sdk", "embed", "--ray", str(archive / "missing"), "-o", str(archive / "out")]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == Exit.FATAL and "missing: no such file or folder" in done.stderr, done.stderr
    bad = subprocess.run([*cli[:-2], "-o", "x.npz"], capture_output=True, text=True)
    assert bad.returncode == Exit.USAGE and "OUTPUT is a folder" in bad.stderr
