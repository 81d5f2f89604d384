"""The `fundus-sdk` command on real EyePACS photos: in this process (click's CliRunner), and in a
real subprocess where only a process shows it (pipes, signals, binary stdout).

One module-scoped workspace holds a folder of graded photos plus four problem files (a
truncated JPEG, a zero-byte PNG, a text file named .jpg, and a CMYK JPEG made from a real
photo), the embeddings and the index built from it. Tests that change an index work on a copy.
Nothing here depends on which model is bundled: only properties any correct model has.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fundus_sdk
from fundus_sdk import Index, load_model
from fundus_sdk.cli import main
from tests.shared import RETINA, eyepacs_rows, eyepacs_sample, given, require_eyepacs

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
BAD_FILES = {  # file name -> words its stderr line must contain
    "corrupt.jpg": "corrupt or truncated",
    "empty.png": "empty",
    "notes.jpg": "not an image",
}


def fundus_command() -> list[str]:
    """The installed `fundus-sdk` script beside this interpreter, else `python -m fundus_sdk`."""
    script = Path(sys.executable).with_name("fundus-sdk")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fundus_sdk"]


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `fundus-sdk ARGS...` to completion in this process, with click's CliRunner (the same
    code the installed command runs; tests of what only a real process has, a pipe closed early,
    binary stdout or a signal, start one). Exit status, stdout and stderr as a subprocess's."""
    with contextlib.chdir(cwd or Path.cwd()), warnings.catch_warnings():
        warnings.simplefilter("default")  # as the command line shows them: on stderr, once
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def run_process(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`fundus-sdk ARGS...` in a real process, for what could hang: killed after `timeout`."""
    return subprocess.run([*fundus_command(), *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Workspace:
    root: Path
    photos: Path  # good photos and the four problem files
    good: list[Path]  # the photos every correct model can embed (incl. the CMYK one)
    grades: dict[str, int]  # file name -> grade, for the photos in labels.csv
    eyes: dict[str, str]  # file name -> eye, ditto
    labels: Path  # CSV: image, grade, eye (the CMYK copy has no row)
    cmyk: Path
    cmyk_source: Path
    npz: Path  # `fundus-sdk embed photos/` output
    embed_proc: subprocess.CompletedProcess
    index: Path  # index built with `index add photos/ --labels labels.csv`
    add_proc: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """Build the photo folder, embed it once and index it once; the tests share the results."""
    require_eyepacs()
    root = tmp_path_factory.mktemp("cli")
    photos = root / "photos"
    photos.mkdir()
    rows = {r["image"]: r for r in eyepacs_rows("test")}
    good, grades, eyes = [], {}, {}
    for src, grade in eyepacs_sample(2, per_grade=True):  # 10 photos, two of each grade
        dst = photos / src.name
        shutil.copyfile(src, dst)
        good.append(dst)
        grades[dst.name], eyes[dst.name] = grade, rows[src.name]["eye"]
    # the problem files
    data = good[0].read_bytes()
    (photos / "corrupt.jpg").write_bytes(data[:600] + bytes(range(256)) * 40)  # valid header, garbage after
    (photos / "empty.png").write_bytes(b"")
    (photos / "notes.jpg").write_text("not a photo, just a note\n")
    cmyk_source = good[3]
    cmyk = photos / "cmyk.jpg"
    Image.open(cmyk_source).convert("CMYK").save(cmyk, quality=95)
    assert Image.open(cmyk).mode == "CMYK"
    good.append(cmyk)

    labels = root / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "grade", "eye"])
        for name, grade in grades.items():
            writer.writerow([name, grade, eyes[name]])

    npz = root / "photos.npz"
    embed_proc = run("embed", photos, "-o", npz, "--batch-size", "4", cwd=root)
    index = root / "cases"
    created = run("index", "create", index, cwd=root)
    assert created.returncode == EXIT_OK, created.stderr
    add_proc = run("index", "add", index, photos, "--labels", labels, "--allow-unlabelled", cwd=root)
    return Workspace(root, photos, good, grades, eyes, labels, cmyk, cmyk_source, npz, embed_proc, index, add_proc)


def copy_index(ws: Workspace, name: str) -> Path:
    """A private copy of the shared index, for tests that change it."""
    dst = ws.root / name
    shutil.copytree(ws.index, dst)
    return dst


def assert_bad_files_reported(stderr: str) -> None:
    """Each problem file is named on stderr with its reason; the CMYK photo is not."""
    for name, reason in BAD_FILES.items():
        lines = [line for line in stderr.splitlines() if name in line]
        assert lines, f"{name} not reported:\n{stderr}"
        assert any(reason in line.lower() for line in lines), lines
    assert "cmyk.jpg" not in stderr


# -- embed -------------------------------------------------------------------------------------


def test_embed_npz_writes_unit_vectors_paths_hashes_and_fingerprint(ws: Workspace) -> None:
    proc = ws.embed_proc
    no_traceback(proc)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert re.search(rf"embedded {len(ws.good)} images, {len(BAD_FILES)} failed", proc.stdout), proc.stdout
    assert_bad_files_reported(proc.stderr)
    model = load_model()
    with np.load(ws.npz) as data:
        vectors, paths, hashes = data["vectors"], data["paths"].tolist(), data["sha256"].tolist()
        assert str(data["model_fingerprint"]) == model.fingerprint
    assert vectors.dtype == np.float32 and vectors.shape == (len(ws.good), model.dim)
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert sorted(paths) == sorted(str(p) for p in ws.good)
    assert hashes == [sha256_of(Path(p)) for p in paths]
    # the command gives the same vectors as the Python API
    np.testing.assert_allclose(vectors, fundus_sdk.embed(paths), atol=1e-4)
    assert not list(ws.root.glob("*.partial")) + list(ws.root.glob(".*.tmp")), "a temporary output file was left behind"


def test_embed_cmyk_photo_is_nearest_to_its_rgb_source(ws: Workspace) -> None:
    with np.load(ws.npz) as data:
        vectors, paths = data["vectors"], data["paths"].tolist()
    sims = vectors @ vectors[paths.index(str(ws.cmyk))]
    sims[paths.index(str(ws.cmyk))] = -np.inf
    assert paths[int(np.argmax(sims))] == str(ws.cmyk_source)


def test_embed_jsonl_format(ws: Workspace) -> None:
    out = ws.root / "photos.out"  # a suffix that would not choose jsonl by itself
    proc = run("embed", *ws.good[:3], ws.photos / "empty.png", "-o", out, "--format", "jsonl", cwd=ws.root)
    no_traceback(proc)
    assert proc.returncode == EXIT_PARTIAL
    assert "empty.png" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in ws.good[:3]]
    with np.load(ws.npz) as data:
        by_path = dict(zip(data["paths"].tolist(), data["vectors"]))
    fingerprint = load_model().fingerprint
    for row in rows:
        assert row["sha256"] == sha256_of(Path(row["path"]))
        assert row["model_fingerprint"] == fingerprint
        vec = np.array(row["vector"], dtype=np.float32)
        assert abs(np.linalg.norm(vec) - 1) < 1e-3
        np.testing.assert_allclose(vec, by_path[row["path"]], atol=1e-4)


def test_embed_all_readable_exits_0(ws: Workspace) -> None:
    out = ws.root / "two.npz"
    proc = run("embed", ws.good[0], ws.good[1], "-o", out, cwd=ws.root)
    no_traceback(proc)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "embedded 2 images, 0 failed" in proc.stdout
    assert proc.stderr.strip() == ""
    with np.load(out) as data:
        assert data["vectors"].shape[0] == 2


# -- index ---------------------------------------------------------------------------------------


def test_index_add_with_labels_keeps_grades_and_extra_fields(ws: Workspace) -> None:
    proc = ws.add_proc
    no_traceback(proc)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert re.search(rf"added {len(ws.good)} cases \({len(BAD_FILES)} failed\)", proc.stdout), proc.stdout
    assert_bad_files_reported(proc.stderr)
    assert "no row in" in proc.stderr  # the CMYK copy is not in labels.csv

    info = run("index", "info", ws.index, "--json")
    assert info.returncode == EXIT_OK, info.stderr
    data = json.loads(info.stdout)
    assert data["cases"] == len(ws.good)
    expected = {str(g): list(ws.grades.values()).count(g) for g in set(ws.grades.values())} | {"none": 1}
    assert data["grades"] == expected
    assert data["model_fingerprint"] == load_model().fingerprint
    assert int(data["dim"]) == load_model().dim

    with Index.open(ws.index, read_only=True) as ix:
        hits = ix.search(str(ws.good[0]), k=len(ix))
    assert sorted(h.path for h in hits) == sorted(str(p) for p in ws.good)
    for h in hits:
        name = Path(h.path).name
        assert h.sha256 == sha256_of(Path(h.path))
        if name == ws.cmyk.name:
            assert h.grade is None and given(h.metadata) == {}
        else:
            assert h.grade == ws.grades[name]
            assert given(h.metadata) == {"eye": ws.eyes[name]}


def test_index_readd_same_folder_adds_nothing(ws: Workspace) -> None:
    index = copy_index(ws, "readd")
    proc = run("index", "add", index, ws.photos, "--labels", ws.labels, "--allow-unlabelled")
    no_traceback(proc)
    assert proc.returncode == EXIT_PARTIAL  # the problem files still fail
    assert f"added 0 cases ({len(BAD_FILES)} failed)" in proc.stdout
    with Index.open(index, read_only=True) as ix:
        assert len(ix) == len(ws.good)


def test_index_add_npz_from_embed(ws: Workspace) -> None:
    index = ws.root / "from-npz"
    assert run("index", "create", index).returncode == EXIT_OK
    proc = run("index", "add", index, ws.npz)
    no_traceback(proc)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert f"added {len(ws.good)} cases (0 failed)" in proc.stdout
    with Index.open(index, read_only=True) as ix:
        assert len(ix) == len(ws.good)
        hits = ix.search(str(ws.good[2]), k=3)
    assert hits[0].path == str(ws.good[2]) and hits[0].score > 0.99  # the photo finds itself
    # the npz recorded the files' content hashes: adding the photos themselves adds nothing new
    again = run("index", "add", index, ws.photos)
    assert "added 0 cases" in again.stdout, again.stdout
    # and adding the npz twice adds nothing either
    twice = run("index", "add", index, ws.npz)
    assert twice.returncode == EXIT_OK and "added 0 cases" in twice.stdout


def test_index_add_npz_with_labels(ws: Workspace) -> None:
    """--labels applies to vectors from an .npz as to photos: matched by the recorded paths."""
    index = ws.root / "from-npz-labelled"
    assert run("index", "create", index).returncode == EXIT_OK
    proc = run("index", "add", index, ws.npz, "--labels", ws.labels, "--allow-unlabelled")
    assert proc.returncode == EXIT_OK, proc.stderr
    labelled = json.loads(run("index", "info", index, "--json").stdout)
    from_photos = json.loads(run("index", "info", ws.index, "--json").stdout)
    assert labelled["grades"] == from_photos["grades"]
    with Index.open(index, read_only=True) as ix:
        hits = ix.search(str(ws.good[0]), k=len(ix))
    assert {(h.path, h.grade) for h in hits} == {(str(p), ws.grades.get(p.name)) for p in ws.good}
    assert all(given(h.metadata) == ({"eye": ws.eyes[Path(h.path).name]} if h.grade is not None else {}) for h in hits)


def test_index_info_text(ws: Workspace) -> None:
    proc = run("index", "info", ws.index)
    no_traceback(proc)
    assert proc.returncode == EXIT_OK, proc.stderr
    fields = dict(line.strip().split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert fields["cases"].startswith(f"{len(ws.good)} (")
    assert f"(fingerprint {load_model().fingerprint[:12]})" in fields["model"]


def test_index_remove(ws: Workspace) -> None:
    index = copy_index(ws, "remove")
    with Index.open(index, read_only=True) as ix:
        before = len(ix)
        victim = ix.search(str(ws.good[0]), k=1)[0]
    assert victim.path == str(ws.good[0])
    proc = run("index", "remove", index, victim.key)
    no_traceback(proc)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "removed 1 of 1" in proc.stdout
    found = run("search", ws.good[0], "--index", index, "-k", 1000, "--json")
    hits = json.loads(found.stdout)[0]["hits"]
    assert len(hits) == before - 1
    assert victim.key not in {h["key"] for h in hits}
    # keys that are not there: reported, exit status 1
    missing = run("index", "remove", index, victim.key, 999999)
    assert missing.returncode == EXIT_PARTIAL
    assert "removed 0 of 2" in missing.stdout


# -- search and evaluate -----------------------------------------------------------------------


def test_search_table(ws: Workspace) -> None:
    query = ws.good[1]
    proc = run("search", query, "--index", ws.index, "-k", 3)
    no_traceback(proc)
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(query)
    assert lines[1].split() == ["rank", "score", "grade", "key", "path"]
    rows = [line.split() for line in lines[3:]]  # under the header's rule
    assert [r[0] for r in rows] == ["1", "2", "3"]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0][4] == str(query) and scores[0] > 0.99  # a photo in the index finds itself first
    for r in rows:
        name = Path(r[4]).name
        assert r[2] == (str(ws.grades[name]) if name in ws.grades else "-")


def test_search_json_several_queries_one_unreadable(ws: Workspace) -> None:
    proc = run("search", ws.good[0], ws.photos / "notes.jpg", ws.good[4], "--index", ws.index, "-k", 5, "--json")
    no_traceback(proc)
    assert proc.returncode == EXIT_PARTIAL
    assert "notes.jpg" in proc.stderr and "not an image" in proc.stderr
    results = json.loads(proc.stdout)
    assert [r["query"] for r in results] == [str(ws.good[0]), str(ws.good[4])]
    for result in results:
        hits = result["hits"]
        assert len(hits) == 5 and len({h["key"] for h in hits}) == 5
        assert hits[0]["path"] == result["query"]
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 + 1e-3 for s in scores)
        for h in hits:
            name = Path(h["path"]).name
            assert h["grade"] == ws.grades.get(name)
            assert given(h["metadata"]) == ({"eye": ws.eyes[name]} if name in ws.eyes else {})
            assert h["sha256"] == sha256_of(Path(h["path"]))


@pytest.mark.parametrize("where, allowed", [("grade=3", {3}), ("grade=1,4", {1, 4})])
def test_search_where_grade(ws: Workspace, where: str, allowed: set[int]) -> None:
    proc = run("search", ws.good[0], "--index", ws.index, "-k", 5, "--where", where, "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    hits = json.loads(proc.stdout)[0]["hits"]
    available = sum(g in allowed for g in ws.grades.values())
    assert len(hits) == min(5, available)
    assert {h["grade"] for h in hits} <= allowed


def test_search_where_metadata_field(ws: Workspace) -> None:
    proc = run("search", ws.good[0], "--index", ws.index, "-k", 20, "--where", "eye=left", "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    hits = json.loads(proc.stdout)[0]["hits"]
    assert len(hits) == list(ws.eyes.values()).count("left")
    assert all(h["metadata"]["eye"] == "left" for h in hits)


def test_evaluate_json(ws: Workspace) -> None:
    queries = ws.photos / "queries.csv"  # image paths are relative to the CSV's folder
    graded = [p for p in ws.good if p.name in ws.grades]
    with open(queries, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "grade"])
        for p in graded:
            writer.writerow([p.name, ws.grades[p.name]])
        writer.writerow(["corrupt.jpg", 2])  # read fails at embedding: named, the rest evaluated
    proc = run("evaluate", "--index", ws.index, "--queries", queries, "-k", 3, "--json", cwd=ws.root)
    no_traceback(proc)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert "corrupt.jpg" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["k"] == 3 and report["n_queries"] == len(graded)
    grades = sorted(set(ws.grades.values()))
    assert report["grades"] == grades
    metric_names = {"mHR", "mAP", "AP", "NDCG"}

    def check(values: dict) -> None:
        assert set(values) == metric_names
        for v in values.values():
            assert 0.0 <= v <= 1.0 + 1e-9, values

    check(report["micro"])
    check(report["macro"])
    check(report["chance"]["micro"])
    check(report["chance"]["macro"])
    for part in (report["per_grade"], report["chance"]["per_grade"]):
        assert set(part) == metric_names
        for per_grade in part.values():
            assert sorted(int(g) for g in per_grade) == grades
            check_values = list(per_grade.values())
            assert all(0.0 <= v <= 1.0 + 1e-9 for v in check_values), per_grade
    # micro is the query-weighted mean of the per-grade values
    counts = {int(g): n for g, n in report["query_counts"].items()}
    for m in metric_names:
        weighted = sum(counts[int(g)] * v for g, v in report["per_grade"][m].items()) / report["n_queries"]
        assert report["micro"][m] == pytest.approx(weighted)


def test_evaluate_ignores_ungraded_cases(ws: Workspace) -> None:
    """A gallery of one graded case: every query retrieves it or nothing, whatever the model."""
    index = ws.root / "one-graded"
    assert run("index", "create", index).returncode == EXIT_OK
    labels = ws.root / "one.csv"
    only = next(p for p in ws.good if ws.grades.get(p.name) == 4)
    labels.write_text(f"image,grade\n{only.name},4\n")
    assert run("index", "add", index, *ws.good, "--labels", labels, "--allow-unlabelled").returncode == EXIT_OK
    queries = ws.photos / "grade0.csv"
    zeros = [p.name for p in ws.good if ws.grades.get(p.name) == 0]
    queries.write_text("image,grade\n" + "".join(f"{n},0\n" for n in zeros))
    proc = run("evaluate", "--index", index, "--queries", queries, "-k", 3, "--json")
    assert proc.returncode == EXIT_OK, proc.stderr
    report = json.loads(proc.stdout)
    # grade-0 queries against a single grade-4 case: no hit and zero graded gain, not less
    assert report["micro"]["mHR"] == 0.0
    assert report["micro"]["NDCG"] == pytest.approx(0.0)


# -- info, help, usage and fatal errors --------------------------------------------------------------


def test_info_json() -> None:
    proc = run("info", "--json")
    no_traceback(proc)
    assert proc.returncode == EXIT_OK, proc.stderr
    data = json.loads(proc.stdout)
    model = load_model()
    assert data["model"]["dim"] == model.dim
    assert data["model"]["fingerprint"] == model.fingerprint
    assert Path(data["model"]["path"]).resolve() == model.path.resolve()
    assert "CPUExecutionProvider" in data["providers"]["in_use"]
    assert data["packages"]["fundus-sdk"] == fundus_sdk.__version__
    assert data["metadata"]["model.fingerprint"] == model.weights_fingerprint  # the exporter's: the weights alone
    assert data["model"]["weights_fingerprint"] == model.weights_fingerprint != model.fingerprint


COMMANDS = [[], ["embed"], ["index"], ["index", "create"], ["index", "add"], ["index", "info"],
            ["index", "remove"], ["search"], ["evaluate"], ["info"]]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "main")
def test_help_has_example(command: list[str]) -> None:
    proc = run(*command, "--help")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "Example" in proc.stdout
    assert "fundus-sdk " + " ".join(command) in proc.stdout


def test_python_dash_m_runs_the_same_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "fundus_sdk", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert fundus_sdk.__version__ in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["search"],  # missing argument
        ["search", "x.jpg"],  # missing --index
        ["search", "x.jpg", "--index", "cases", "--where", "grade"],  # bad --where
        ["search", "x.jpg", "--index", "cases", "--where", "=2"],
        ["search", "x.jpg", "--index", "cases", "-k", "0"],
        ["embed"],
        ["index", "add", "cases"],
        ["index", "update", "cases", "1"],  # missing --set
        ["embed", "x.jpg", "--format", "csv"],
        ["nosuchcommand"],
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    proc = run(*args, cwd=tmp_path)
    no_traceback(proc)
    assert proc.returncode == EXIT_USAGE, (proc.stdout, proc.stderr)
    assert "Usage:" in proc.stderr and "Error" in proc.stderr


def test_fatal_errors_exit_3(ws: Workspace, tmp_path: Path) -> None:
    missing_index = tmp_path / "no-index"
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"\x08\x07garbage, not a protobuf")
    broken_index = tmp_path / "broken"
    broken_index.mkdir()
    (broken_index / "cases.sqlite").write_bytes(b"this is not a database" * 100)
    queries = tmp_path / "queries.csv"
    queries.write_text(f"image,grade\n{ws.good[0]},{ws.grades[ws.good[0].name]}\n")
    cases = [
        (["search", ws.good[0], "--index", missing_index], str(missing_index)),
        (["index", "info", missing_index], str(missing_index)),
        (["index", "add", missing_index, ws.good[0]], str(missing_index)),
        (["evaluate", "--index", missing_index, "--queries", queries], str(missing_index)),
        (["index", "info", broken_index], str(broken_index)),
        (["embed", ws.good[0], "--model", tmp_path / "missing.onnx", "-o", tmp_path / "x.npz"], "missing.onnx"),
        (["info", "--model", tmp_path / "missing.onnx"], "missing.onnx"),
        (["index", "create", tmp_path / "new", "--model", not_onnx], "model.onnx"),
        (["embed", tmp_path / "no-such-folder"], "no-such-folder"),
        (["index", "create", ws.index], str(ws.index)),  # exists and is not empty
    ]
    for args, named in cases:
        proc = run(*args, cwd=tmp_path)
        no_traceback(proc)
        assert proc.returncode == EXIT_FATAL, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: ") and named in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "x.npz").exists()


# -- interruption ------------------------------------------------------------------------------------


def test_ctrl_c_during_index_add_leaves_a_consistent_index(tmp_path: Path) -> None:
    """SIGINT once the first batch is embedded: exit 130 (or 0 if it won the race), index intact."""
    require_eyepacs()
    photos = tmp_path / "photos"
    photos.mkdir()
    inputs = []
    for src, _ in eyepacs_sample(40, split="train"):
        dst = photos / src.name
        shutil.copyfile(src, dst)
        inputs.append(str(dst))
    index = tmp_path / "cases"
    assert run("index", "create", index).returncode == EXIT_OK

    # stderr on a pseudo-terminal: the command then draws its progress bar, which says when
    # the first batch is done
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*fundus_command(), "index", "add", str(index), str(photos), "--batch-size", "4"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, text=True,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    interrupted = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
            if re.search(rb"\b([1-9]\d*)/40\b", seen):  # the bar moved: a batch is done
                proc.send_signal(signal.SIGINT)
                interrupted = True
                break
        stdout, _ = proc.communicate(timeout=120)
        while True:  # the rest of stderr
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    stderr = seen.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert interrupted or proc.returncode == EXIT_OK, stderr
    assert proc.returncode in (EXIT_INTERRUPTED, EXIT_OK), (proc.returncode, stdout, stderr)
    if proc.returncode == EXIT_INTERRUPTED:
        assert "interrupted" in stderr

    def check_consistent() -> int:
        with Index.open(index, read_only=True) as ix:
            n = len(ix)
            assert ix.check()["ok"]
            hits = ix.search(inputs[0], k=max(n, 1))
            assert len(hits) == n
            assert len({h.key for h in hits}) == n
            assert {h.path for h in hits} <= set(inputs)
            for h in hits:
                assert h.sha256 == sha256_of(Path(h.path))
        assert not list(index.glob("*.tmp"))
        return n

    kept = check_consistent()
    if proc.returncode == EXIT_OK:
        assert kept == len(inputs)
    # the interrupted index takes the rest of the work: running the command again completes it
    again = run("index", "add", index, photos)
    assert again.returncode == EXIT_OK, again.stderr
    assert f"added {len(inputs) - kept} cases" in again.stdout
    assert check_consistent() == len(inputs)


def test_embed_to_stdout_and_refused_targets(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(RETINA, photos / "retina.jpg")
    text = run("embed", str(photos), "-o", "-", "-q")
    assert text.returncode == EXIT_OK, text.stderr
    row = json.loads(text.stdout.splitlines()[0])
    dim = load_model().dim
    assert row["path"].endswith("retina.jpg") and len(row["vector"]) == dim and "embedded 1 images" in text.stderr
    binary = subprocess.run([sys.executable, "-m", "fundus_sdk", "embed", str(photos), "-o", "-", "--format", "npz", "-q"],
                            capture_output=True, check=True).stdout  # fmt: skip
    with np.load(io.BytesIO(binary)) as data:
        assert data["vectors"].shape == (1, dim)
    os.mkfifo(tmp_path / "pipe.npz")  # like /dev/stdout: never to be replaced by a file
    for target, words in (("x.csv", "cannot tell the format"), ("pipe.npz", "not a regular file")):
        refused = run("embed", str(photos), "-o", str(tmp_path / target), "-q")
        assert refused.returncode == EXIT_USAGE and words in refused.stderr, refused.stderr
    assert not (tmp_path / "x.csv").exists() and (tmp_path / "pipe.npz").is_fifo()


def test_every_embedding_command_takes_threads_and_provider(tmp_path):
    for command in (["embed"], ["index", "add"], ["search"], ["evaluate"], ["index", "rebuild"], ["info"]):
        text = run(*command, "--help").stdout
        assert "--threads" in text and "--provider" in text, command
    proc = run("embed", str(RETINA), "-o", str(tmp_path / "e.jsonl"), "--threads", "1", "--provider", "cpu", "-q")
    assert proc.returncode == EXIT_OK, proc.stderr
    bad = run("embed", str(RETINA), "-o", str(tmp_path / "e.jsonl"), "--provider", "TPUExecutionProvider", "-q")
    assert bad.returncode == EXIT_FATAL and "TPUExecutionProvider is not available" in bad.stderr


def test_devices_fifos_and_dangling_links_are_named_and_the_rest_is_embedded(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copyfile(RETINA, folder / "a.jpg")
    os.mkfifo(folder / "pipe.jpg")  # opening it would block forever
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    proc = run_process("embed", folder, tmp_path / "zero.jpg", "-o", tmp_path / "out.npz")
    no_traceback(proc)
    assert proc.returncode == 1, proc.stderr  # partial: the photo embedded, the rest named
    assert f"{folder / 'pipe.jpg'}: not a regular file (a FIFO (named pipe))" in proc.stderr
    assert f"{folder / 'gone.jpg'}: dangling symbolic link" in proc.stderr
    assert f"{tmp_path / 'zero.jpg'}: not a regular file (a character device), linked to /dev/zero" in proc.stderr
    assert list(np.load(tmp_path / "out.npz")["paths"]) == [str(folder / "a.jpg")]


def test_a_tiny_dicom_declaring_a_billion_frames_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    import pydicom

    from tests.dicom_files import make_dicom, photo

    path = make_dicom(tmp_path / "many.dcm", photo(RETINA, 64))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 10**9
    ds.save_as(path)
    proc = run_process("embed", path, "-o", tmp_path / "out.npz")
    no_traceback(proc)
    assert proc.returncode != 0 and f"{path}: declares 1000000000 frames, more than its" in proc.stderr


def test_a_closed_pipe_ends_quietly(ws: Workspace) -> None:
    proc = subprocess.run(f"{' '.join(fundus_command())} index info {ws.index} | head -1", shell=True, capture_output=True,
                          text=True, timeout=120, executable="/bin/bash", stdin=subprocess.DEVNULL)  # fmt: skip
    assert proc.stdout.count("\n") == 1 and proc.stderr == "", proc.stderr
    piped = subprocess.run(f"set -o pipefail; {' '.join(fundus_command())} index export {ws.index} -o - | head -1", shell=True,
                           capture_output=True, text=True, timeout=120, executable="/bin/bash", stdin=subprocess.DEVNULL)  # fmt: skip
    assert piped.returncode == 0 and "Broken pipe" not in piped.stderr, piped.stderr


def test_update_says_how_many_cases_it_updated_and_other_writers_adds_are_not_counted(ws: Workspace) -> None:
    index = copy_index(ws, "updated")
    with Index.open(index, model=load_model()) as ix:  # another writer's case, committed before this run
        ix.add(np.eye(1, ix.dim, dtype=np.float32), model_fingerprint=ix.model.fingerprint)
    labels = ws.root / "regraded.csv"
    names = [p.name for p in ws.good[:2]]
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["image", "grade"], *([n, (ws.grades[n] + 1) % 5] for n in names)])
    proc = run("index", "add", index, *ws.good[:2], "--labels", labels, "--update", cwd=ws.root)
    no_traceback(proc)
    assert proc.returncode == EXIT_OK and "added 0 cases, 2 updated (0 failed)" in proc.stdout, proc.stdout + proc.stderr


def test_an_interrupted_add_says_how_many_cases_it_kept(ws: Workspace, monkeypatch) -> None:
    from click.testing import CliRunner

    from fundus_sdk.cli import main

    index = ws.root / "interrupted"
    assert run("index", "create", index, cwd=ws.root).returncode == EXIT_OK
    real_add = Index.add

    def add_two_then_interrupt(self, items, metadata=None, **kwargs):  # Ctrl-C after the first two were committed
        real_add(self, items[:2], None if metadata is None else metadata[:2], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Index, "add", add_two_then_interrupt)
    result = CliRunner().invoke(main, ["index", "add", str(index), *map(str, ws.good[:4])])
    assert result.exit_code == 130 and "interrupted: 2 cases were committed before it and are kept" in result.output


def test_info_texts_speak_to_users_not_developers(ws: Workspace) -> None:
    proc = run("index", "info", ws.index)
    assert proc.returncode == EXIT_OK, proc.stderr
    for internal in ("generation", "vectors_generation", "{", "vectors_sha256", "connectivity"):
        assert internal not in proc.stdout, proc.stdout
    assert "cases:" in proc.stdout and "grade 0" in proc.stdout and "photo paths: absolute" in proc.stdout
    model = run("info")
    assert "../shared" not in model.stdout and "trained on:  eyepacs256 (" in model.stdout


def test_misses_and_merges_are_named(ws: Workspace) -> None:
    index = copy_index(ws, "named")
    present = ws.good[0]
    proc = run("index", "remove", index, present, "999999", "nowhere.jpg", cwd=ws.root)
    assert proc.returncode == EXIT_PARTIAL and "removed 1 of 3 cases" in proc.stdout
    assert "not removed 999999: no such case" in proc.stderr and "not removed nowhere.jpg: no such case" in proc.stderr
    folder = ws.root / "twice"
    folder.mkdir()
    shutil.copyfile(ws.good[1], folder / "a.jpg")
    shutil.copyfile(ws.good[1], folder / "b.jpg")
    fresh = ws.root / "fresh"
    assert run("index", "create", fresh).returncode == EXIT_OK
    added = run("index", "add", fresh, folder)
    assert f"note: {folder / 'b.jpg'} is the same photo as {folder / 'a.jpg'} (same content): one case" in added.stderr
    searched = run("search", folder, "--index", ws.index, "-k", 1, "--json")  # a folder of queries, as embed takes
    assert searched.returncode == EXIT_OK, searched.stderr
    assert [q["query"] for q in json.loads(searched.stdout)] == [str(folder / "a.jpg"), str(folder / "b.jpg")]
