"""The case index never stores a wrong fact: labels matched by path, not by bare name; paths that
open from anywhere; adds that resume; corrections that are recorded; typed filters.

Each test reproduces a way the index used to let wrong data in, on real photos and a real index.
"""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from fundus_sdk import ICDR, Index, LabelError, Scale, load_model
from fundus_sdk.filters import FilterError
from fundus_sdk.labels import match_labels, parse_value, read_labels
from tests.shared import eyepacs_sample, require_eyepacs

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_FATAL = 0, 1, 2, 3


def fundus(*args, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("fundus-sdk")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "fundus_sdk"]
    proc = subprocess.run([*cmd, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    """Five real photos, one of each grade."""
    require_eyepacs()
    return [p for p, _ in eyepacs_sample(1, per_grade=True)]


def stored(index: Path) -> dict[str, tuple]:
    """{path: (grade, metadata)} as the index holds them, less the gradability the input gate measured."""
    with Index.open(index, read_only=True) as ix:
        assert all(0 <= c.metadata.get("gradability", 0) <= 1 for c in ix)
        return {c.path: (c.grade, {k: v for k, v in c.metadata.items() if k != "gradability"}) for c in ix}


# -- 1. labels match photos by path ---------------------------------------------------------------


def test_two_photos_with_one_name_in_two_folders_keep_their_own_grades(tmp_path, photos):
    for sub, src in (("a", photos[4]), ("b", photos[0])):
        (tmp_path / "photos" / sub).mkdir(parents=True)
        shutil.copyfile(src, tmp_path / "photos" / sub / "IMG_0001.jpg")
    labels = write_csv(tmp_path / "labels.csv", ["image", "grade"], [["a/IMG_0001.jpg", 4], ["b/IMG_0001.jpg", 0]])
    assert fundus("index", "create", "cases", cwd=tmp_path).returncode == EXIT_OK
    proc = fundus("index", "add", "cases", "photos", "-r", "--labels", labels, cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    grades = {Path(p).parent.name: g for p, (g, _) in stored(tmp_path / "cases").items()}
    assert grades == {"a": 4, "b": 0}


def test_patient_folders_with_the_same_file_names(tmp_path, photos):
    rows = []
    for patient, src, grade in (("P001", photos[0], 0), ("P002", photos[2], 2), ("P003", photos[4], 4)):
        (tmp_path / "photos" / patient).mkdir(parents=True)
        shutil.copyfile(src, tmp_path / "photos" / patient / "left.jpg")
        rows.append([f"photos/{patient}/left.jpg", grade, patient])
    labels = write_csv(tmp_path / "labels.csv", ["image", "grade", "patient"], rows)  # paths relative to the CSV
    fundus("index", "create", "cases", cwd=tmp_path)
    proc = fundus("index", "add", "cases", "photos", "-r", "--labels", labels, cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    got = {Path(p).parent.name: (g, m["patient"]) for p, (g, m) in stored(tmp_path / "cases").items()}
    assert got == {"P001": (0, "P001"), "P002": (2, "P002"), "P003": (4, "P003")}


def test_a_bare_name_that_fits_two_photos_is_an_error_naming_both(tmp_path, photos):
    for patient, src in (("P001", photos[0]), ("P002", photos[2])):
        (tmp_path / "photos" / patient).mkdir(parents=True)
        shutil.copyfile(src, tmp_path / "photos" / patient / "left.jpg")
    labels = write_csv(tmp_path / "labels.csv", ["image", "grade"], [["left.jpg", 2]])
    fundus("index", "create", "cases", cwd=tmp_path)
    proc = fundus("index", "add", "cases", "photos", "-r", "--labels", labels, cwd=tmp_path)
    assert proc.returncode == EXIT_FATAL
    assert "P001/left.jpg" in proc.stderr and "P002/left.jpg" in proc.stderr and "row 2" in proc.stderr
    assert stored(tmp_path / "cases") == {}  # nothing was added on a guess


def test_duplicate_rows_are_refused_with_their_row_numbers(tmp_path, photos):
    rows = read_labels(write_csv(tmp_path / "l.csv", ["image", "grade"], [["x.jpg", 1], ["y.jpg", 2], ["x.jpg", 3]]),
                       require_files=False)  # fmt: skip
    with pytest.raises(LabelError, match="rows 2 and 4 both label 'x.jpg'"):
        match_labels([tmp_path / "x.jpg"], rows)


def test_a_photo_without_a_row_is_named_and_skipped_unless_allowed(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in photos[:3]:
        shutil.copyfile(src, folder / src.name)
    labels = write_csv(tmp_path / "labels.csv", ["image", "grade"], [[photos[0].name, 0], [photos[1].name, 1]])
    fundus("index", "create", "cases", cwd=tmp_path)
    proc = fundus("index", "add", "cases", "photos", "--labels", labels, cwd=tmp_path)
    assert proc.returncode == EXIT_PARTIAL
    assert f"{photos[2].name}: no row in" in proc.stderr
    assert len(stored(tmp_path / "cases")) == 2
    proc = fundus("index", "add", "cases", "photos", "--labels", labels, "--allow-unlabelled", cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    grades = {Path(p).name: g for p, (g, _) in stored(tmp_path / "cases").items()}
    assert grades == {photos[0].name: 0, photos[1].name: 1, photos[2].name: None}


# -- 2. paths open from anywhere ------------------------------------------------------------------


def test_stored_paths_open_from_any_directory(tmp_path, photos):
    (tmp_path / "photos").mkdir()
    shutil.copyfile(photos[0], tmp_path / "photos" / "a.jpg")
    fundus("index", "create", "cases", cwd=tmp_path)
    fundus("index", "add", "cases", "photos", cwd=tmp_path)
    (path,) = stored(tmp_path / "cases")
    assert Path(path).is_absolute() and Path(path).is_file()


def test_an_index_with_a_root_stores_paths_relative_to_it(tmp_path, photos):
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copyfile(photos[1], archive / "b.jpg")
    with Index.create(tmp_path / "cases", root=archive) as ix:
        ix.add([archive / "b.jpg"])
    raw = sqlite3.connect(tmp_path / "cases" / "cases.sqlite").execute("SELECT path FROM cases").fetchone()[0]
    assert raw == "b.jpg"
    assert stored(tmp_path / "cases") == {str(archive.resolve() / "b.jpg"): (None, {})}


# -- 3. adds are resumable --------------------------------------------------------------------------


@contextmanager
def counting(model) -> Iterator[list[int]]:
    """Record how many inputs each call of the model's real iter_embed receives."""
    calls: list[int] = []
    original = type(model).iter_embed

    def iter_embed(items, **kwargs):
        items = list(items)
        calls.append(len(items))
        return original(model, items, **kwargs)

    model.iter_embed = iter_embed
    try:
        yield calls
    finally:
        del model.iter_embed


def test_photos_already_indexed_are_not_embedded_again(tmp_path, photos):
    with Index.create(tmp_path / "cases", model=load_model()) as ix:
        ix.add(photos[:3])
    with Index.open(tmp_path / "cases") as ix, counting(ix.model) as calls:
        keys = ix.add(list(photos))
    assert calls == [2]  # only the two new photos were decoded and embedded
    assert len(set(keys)) == 5


def test_an_interrupted_add_keeps_its_finished_steps_and_a_rerun_completes_it(tmp_path, photos):
    seen = []

    def interrupt_after_three(n: int) -> None:
        seen.append(n)
        if sum(seen) >= 3:
            raise KeyboardInterrupt

    with Index.create(tmp_path / "cases") as ix:
        with pytest.raises(KeyboardInterrupt):
            ix.add(list(photos), batch_size=1, commit_seconds=0.0, progress=interrupt_after_three)
        assert len(ix) == 2  # the two steps finished before the interruption were committed
        with counting(ix.model) as calls:
            ix.add(list(photos))
        assert len(ix) == 5 and calls == [3]  # the re-run embedded exactly what was missing


# -- 4. corrections are explicit and recorded -----------------------------------------------------------


def test_readding_with_another_grade_keeps_the_stored_one_and_says_so(tmp_path, photos):
    with Index.create(tmp_path / "cases") as ix:
        (key,) = ix.add([photos[2]], [{"grade": 2}])
        with pytest.warns(UserWarning, match="stored grade 2, given 3"):
            ix.add([photos[2]], [{"grade": 3}])
        assert ix.get(key).grade == 2
        ix.add([photos[2]], [{"grade": 3}], on_conflict="update")
        assert ix.get(key).grade == 3
        (change,) = ix.history(key)
        assert (change.field, change.old, change.new) == ("grade", 2, 3)


def test_update_by_key_path_or_sha_on_the_command_line(tmp_path, photos):
    (tmp_path / "photos").mkdir()
    shutil.copyfile(photos[1], tmp_path / "photos" / "p.jpg")
    fundus("index", "create", "cases", cwd=tmp_path)
    fundus("index", "add", "cases", "photos", cwd=tmp_path)
    with Index.open(tmp_path / "cases", read_only=True) as ix:
        case = next(iter(ix))
    for ref, grade in ((case.key, 1), ("photos/p.jpg", 2), (case.sha256, 3)):
        proc = fundus("index", "update", "cases", ref, "--set", f"grade={grade}", "--set", "reader=ab", cwd=tmp_path)
        assert proc.returncode == EXIT_OK, proc.stderr
    with Index.open(tmp_path / "cases", read_only=True) as ix:
        assert ix.get(case.key).grade == 3 and ix.get(case.key).metadata["reader"] == "ab"
        assert [(c.old, c.new) for c in ix.history(case.key) if c.field == "grade"] == [(None, 1), (1, 2), (2, 3)]
    history = fundus("index", "history", "cases", case.key, "--json", cwd=tmp_path)
    assert [c["new"] for c in json.loads(history.stdout) if c["field"] == "grade"] == [1, 2, 3]
    missing = fundus("index", "update", "cases", "999", "--set", "grade=1", cwd=tmp_path)
    assert missing.returncode == EXIT_FATAL and "no case 999" in missing.stderr


# -- 5. reads: get, iterate, export, remove by path or sha ---------------------------------------------


def test_export_and_remove_by_path_and_sha(tmp_path, photos):
    with Index.create(tmp_path / "cases") as ix:
        keys = ix.add(photos[:3], [{"grade": g, "eye": "left"} for g in (0, 1, 2)])
        n = ix.export(tmp_path / "cases.csv")
        ix.export(tmp_path / "cases.jsonl")
        assert n == 3
        rows = list(csv.DictReader(open(tmp_path / "cases.csv")))
        assert [int(r["key"]) for r in rows] == keys and [r["eye"] for r in rows] == ["left"] * 3
        assert [json.loads(line)["grade"] for line in open(tmp_path / "cases.jsonl")] == [0, 1, 2]
        assert ix.remove([photos[0], ix.get(keys[1]).sha256, 12345]) == 2
        assert [c.key for c in ix] == [keys[2]]


def test_keys_are_never_reused(tmp_path, photos):
    with Index.create(tmp_path / "cases") as ix:
        first = ix.add(photos[:2])
        ix.remove([first[1]])
        (again,) = ix.add([photos[2]])
        assert again not in first


# -- 6. typed filters ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graded(tmp_path_factory, photos) -> Path:
    root = tmp_path_factory.mktemp("graded")
    (root / "photos").mkdir()
    rows = []
    for i, src in enumerate(photos):
        shutil.copyfile(src, root / "photos" / src.name)
        rows.append([src.name, i, 10310 + i % 2, "left" if i % 2 else "right", 50 + 5 * i])
    labels = write_csv(root / "labels.csv", ["image", "grade", "patient", "eye", "age"], rows)
    fundus("index", "create", "cases", cwd=root)
    assert fundus("index", "add", "cases", "photos", "--labels", labels, cwd=root).returncode == EXIT_OK
    return root


def test_csv_numbers_are_numbers_and_filters_compare_by_type(graded, photos):
    proc = fundus("search", photos[0], "--index", "cases", "-k", 5, "--where", "patient=10310", "--json", cwd=graded)
    assert proc.returncode == EXIT_OK, proc.stderr
    hits = json.loads(proc.stdout)[0]["hits"]
    assert sorted(h["grade"] for h in hits) == [0, 2, 4]
    assert all(h["metadata"]["patient"] == 10310 for h in hits)
    ranged = fundus("search", photos[0], "--index", "cases", "--where", "age>=60", "--where", "grade!=4", "--json", cwd=graded)
    assert sorted(h["grade"] for h in json.loads(ranged.stdout)[0]["hits"]) == [2, 3]


def test_exclude_leaves_out_the_query_patients_own_photos(graded, photos):
    with Index.open(graded / "cases", read_only=True) as ix:
        hits = ix.search(photos[0], k=5, exclude={"patient": 10310})
        assert sorted(h.grade for h in hits) == [1, 3]
        assert sorted(h.grade for h in ix.search(photos[0], k=5, where={"age": {">": 52, "<": 68}})) == [1, 2, 3]


def test_an_unknown_field_is_an_error_listing_the_known_ones(graded, photos):
    with Index.open(graded / "cases", read_only=True) as ix:
        with pytest.raises(FilterError, match="unknown field .pateint.; the index knows: added, age, eye, gradability, grade, key, path, patient, sha256"):
            ix.search(photos[0], where={"pateint": 10310})
    for bad in ("pateint=1", 'eye"=left', "grade~2"):
        proc = fundus("search", photos[0], "--index", "cases", "--where", bad, cwd=graded)
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert "sqlite" not in proc.stderr.lower()


def test_values_parse_as_what_they_mean():
    assert [parse_value(v) for v in ("12", "-3", "0.5", "007", "left", "1e3", "")] == [12, -3, 0.5, "007", "left", 1000.0, ""]


# -- 7. reserved names ----------------------------------------------------------------------------------


def test_a_scale_reads_its_values_and_names_and_refuses_what_is_off_it():
    assert Scale.parse("0-4") == ICDR and ICDR.span == 4 and list(Scale.parse("1-3").values) == [1, 2, 3]
    named = Scale.parse("none, mild ,severe")
    assert named.spec == "none,mild,severe" and Scale.parse(named.spec) == named and named.span == 2
    assert [named.read(c) for c in ("none", "mild", "severe", "1")] == [0, 1, 2, 1]
    assert 2 in named and 3 not in named and True not in named and 1.0 not in named
    for cell, message in (("3", "outside the scale none,mild,severe"), ("moderate", "not a whole number or a name")):
        with pytest.raises(ValueError, match=message):
            named.read(cell)
    for spec in ("4-0", "x", "1,2", "a,,b", "a,a"):
        with pytest.raises(ValueError):
            Scale.parse(spec)


def test_label_files_on_a_named_scale(tmp_path, photos):
    rows = [[p.name, g] for p, g in zip(photos[:3], ("none", "severe", "mild"))]
    labels = write_csv(tmp_path / "labels.csv", ["image", "grade"], rows)
    scale = Scale.parse("none,mild,severe")
    found = read_labels(labels, photos[0].parent, scale=scale)
    assert [r.grade for r in found] == [0, 2, 1]
    with pytest.raises(LabelError, match=r"row 2 .*'none' is not a whole number of the scale 0-4"):
        read_labels(labels, photos[0].parent)


def test_a_csv_with_sha256_and_path_columns_cannot_override_them(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in photos:
        shutil.copyfile(src, folder / src.name)
    rows = [[src.name, i, "same-for-all", "/elsewhere/x.jpg"] for i, src in enumerate(photos)]
    labels = write_csv(tmp_path / "labels.csv", ["image", "grade", "sha256", "path"], rows)
    fundus("index", "create", "cases", cwd=tmp_path)
    proc = fundus("index", "add", "cases", "photos", "--labels", labels, cwd=tmp_path)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "label_sha256" in proc.stderr and "label_path" in proc.stderr
    cases = stored(tmp_path / "cases")
    assert len(cases) == 5 and all(Path(p).is_file() for p in cases)
    assert {m["label_path"] for _, m in cases.values()} == {"/elsewhere/x.jpg"}
    with Index.open(tmp_path / "cases") as ix, pytest.raises(ValueError, match="'sha256' is reserved"):
        ix.add(np.zeros((1, ix.dim), np.float32) + 1 / np.sqrt(ix.dim), [{"sha256": "x"}])


# -- a new model strands no index -----------------------------------------------------------------------


def test_rebuild_keeps_keys_metadata_and_history_and_lists_what_it_could_not_redo(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    copies = [folder / src.name for src in photos]
    for src, dst in zip(photos, copies):
        shutil.copyfile(src, dst)
    with Index.create(tmp_path / "old") as ix:
        keys = ix.add(copies, [{"grade": g, "eye": "left"} for g in range(5)])
        ix.update(keys[1], {"grade": 2})
    copies[3].unlink()  # gone
    shutil.copyfile(photos[0], copies[4])  # changed content at the same path
    before = sorted((tmp_path / "old").iterdir())
    proc = fundus("index", "rebuild", "old", "new", cwd=tmp_path)
    assert proc.returncode == EXIT_PARTIAL, proc.stderr
    assert f"case {keys[3]}: {copies[3]}: the photo is gone" in proc.stderr
    assert f"case {keys[4]}: {copies[4]}: the photo changed" in proc.stderr
    assert "rebuilt 3 of 5 cases" in proc.stdout
    assert sorted((tmp_path / "old").iterdir()) == before  # the old index is untouched
    with Index.open(tmp_path / "old", read_only=True) as old, Index.open(tmp_path / "new", read_only=True) as new:
        assert [(c.key, c.grade, c.metadata, c.added) for c in new] == [
            (c.key, c.grade, c.metadata, c.added) for c in old if c.key in keys[:3]
        ]
        assert [(c.field, c.old, c.new) for c in new.history(keys[1])] == [("grade", 1, 2)]
        hit = new.search(copies[2], k=1)[0]
        assert hit.key == keys[2] and hit.score > 0.99


def test_every_bad_label_row_is_named_at_once_and_a_whole_float_grade_is_read(tmp_path, photos):
    rows = [[photos[0].name, "O", ""], [photos[1].name, "7", ""], [photos[2].name, "2.0", ""], [photos[3].name, "1", "1e999"]]
    csv_path = write_csv(tmp_path / "labels.csv", ["image", "grade", "dose"], rows)
    with pytest.raises(LabelError) as caught:
        read_labels(csv_path, photos[0].parent)
    message = str(caught.value)
    assert "3 problem(s)" in message and "row 2" in message and "row 3" in message and "row 4" not in message
    assert "row 5" in message and "'dose'" in message and "too large" in message
    fixed = write_csv(tmp_path / "fixed.csv", ["image", "grade"], [[photos[2].name, "2.0"]])
    assert read_labels(fixed, photos[0].parent)[0].grade == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {"dose": [1.0, float("-inf")]}])
def test_a_non_finite_metadata_value_is_refused_by_name(tmp_path, value):
    from fundus_sdk.records import check_metadata

    with pytest.raises(ValueError, match="'dose'.*not finite"):
        check_metadata({"grade": 1, "dose": value})


def test_exports_are_inert_private_and_never_replace_a_link(tmp_path, photos):
    import stat

    with Index.create(tmp_path / "cases") as ix:
        ix.add(photos[:2], [{"grade": 0, "note": "=cmd|' /C calc'!A0", "dose": -3}, {"grade": 1, "note": "+HYPERLINK(\"x\")"}])
    real = tmp_path / "real.csv"
    real.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    proc = fundus("index", "export", "cases", "-o", link, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and link.resolve() == real  # the link kept, its target written
    rows = list(csv.DictReader(open(real)))
    assert [r["note"] for r in rows] == ["'=cmd|' /C calc'!A0", "'+HYPERLINK(\"x\")"] and rows[0]["dose"] == "-3"
    fresh = tmp_path / "fresh.jsonl"
    assert fundus("index", "export", "cases", "-o", fresh, cwd=tmp_path).returncode == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    to_stdout = fundus("index", "export", "cases", "-o", "-", cwd=tmp_path)
    assert to_stdout.returncode == 0 and to_stdout.stdout.splitlines()[0].startswith("key,path,sha256")
    assert not (tmp_path / "-").exists() and "exported 2 cases -> stdout" in to_stdout.stderr


@pytest.mark.parametrize("field", ["gradability", "patient_pseudonym", "sha256"])
def test_fields_the_index_derives_are_refused_as_metadata(tmp_path, photos, field):
    with Index.create(tmp_path / "cases") as ix:
        with pytest.raises(ValueError, match=f"metadata field '{field}' is reserved"):
            ix.add(photos[:1], [{"grade": 0, field: "0.1"}])
    csv_path = write_csv(tmp_path / "labels.csv", ["image", "grade", field], [[photos[0].name, 1, "spoof"]])
    proc = fundus("index", "add", "cases", photos[0], "--labels", csv_path, cwd=tmp_path)
    assert proc.returncode == 0 and f"kept as label_{field}" in proc.stderr
    with Index.open(tmp_path / "cases", read_only=True) as ix:
        (case,) = list(ix)
        assert case.metadata[f"label_{field}"] == "spoof" and case.metadata.get(field) != "spoof"


def test_a_label_file_without_a_grade_column_is_an_error_unless_ungraded(tmp_path, photos):
    csv_path = write_csv(tmp_path / "labels.csv", ["image", "eye"], [[photos[0].name, "left"]])
    assert fundus("index", "create", "cases", cwd=tmp_path).returncode == 0
    proc = fundus("index", "add", "cases", photos[0], "--labels", csv_path, cwd=tmp_path)
    assert proc.returncode == EXIT_FATAL and "missing column(s) grade; found ['image', 'eye']" in proc.stderr
    proc = fundus("index", "add", "cases", photos[0], "--labels", csv_path, "--ungraded", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with Index.open(tmp_path / "cases", read_only=True) as ix:
        assert [(c.grade, c.metadata["eye"]) for c in ix] == [(None, "left")]


def test_a_removal_is_in_the_history_and_purges_identifiers(tmp_path, photos):
    with Index.create(tmp_path / "cases") as ix:
        key, other = ix.add(photos[:2], [{"grade": 1}, {"grade": 2}])
        ix.update(key, {"grade": 2, "PatientName": "Doe^Jane", "site": "north"})
        assert ix.remove([key]) == 1
        fields = [(c.field, c.old, c.new) for c in ix.history(key)]
        assert fields[:2] == [("grade", 1, 2), ("site", None, "north")]
        assert fields[2][0] == "case" and fields[2][1]["grade"] == 2 and fields[2][2] is None
        assert "Doe^Jane" not in json.dumps([asdict(c) for c in ix.history()])
        with pytest.raises(KeyError, match="has no case 999"):
            ix.history(999)
    proc = fundus("index", "history", "cases", "999", cwd=tmp_path)
    assert proc.returncode != 0 and "no case 999" in proc.stderr


def test_filters_compare_ids_by_value_and_refuse_what_is_no_operator(graded, photos):
    with Index.open(graded / "cases", read_only=True) as ix:
        as_text = ix.search(photos[0], k=5, exclude={"patient": "10310"})
        assert as_text and all(h.metadata["patient"] != 10310 for h in as_text)
        assert {h.key for h in as_text} == {h.key for h in ix.search(photos[0], k=5, exclude={"patient": 10310})}
        assert len(ix.search(photos[0], k=5, where={"grade": {"<=": 10**30}})) == 5  # beyond SQLite's integers
    proc = fundus("search", photos[0], "--index", "cases", "--where", "grade=>3", cwd=graded)
    assert proc.returncode == EXIT_USAGE and "'=>' is not an operator" in proc.stderr
    proc = fundus("search", photos[0], "--index", "cases", "--where", "eye=Left", cwd=graded)
    assert proc.returncode == EXIT_PARTIAL and "no case matches --where eye=Left; eye holds 'left', 'right'" in proc.stderr
    listed = fundus("search", photos[0], "--index", "cases", "--where", "eye in left", "--where", "grade==1", "--json", cwd=graded)
    assert [h["grade"] for h in json.loads(listed.stdout)[0]["hits"]] == [1]


def test_evaluate_leaves_out_the_query_patients_other_photos_unless_asked(tmp_path, photos):
    with Index.create(tmp_path / "cases") as ix:  # photos[1] is the query patient's other eye, patient 7
        ix.add(photos[1:], [{"grade": g, "patient": p} for g, p in zip((1, 2, 3, 4), (7, 8, 9, 10))])
    queries = write_csv(tmp_path / "queries.csv", ["image", "grade", "patient"], [[str(photos[0]), 1, "7"]])
    default = fundus("evaluate", "--index", "cases", "--queries", queries, "-k", 4, "--json", cwd=tmp_path)
    kept = fundus("evaluate", "--index", "cases", "--queries", queries, "-k", 4, "--json", "--keep-own-patient", cwd=tmp_path)
    left_out, counted = json.loads(default.stdout), json.loads(kept.stdout)
    assert left_out["micro"]["mHR"] == 0.0 and counted["micro"]["mHR"] == 0.25  # the fellow eye is the only grade-1 case
    assert "1 queries name their patient" in left_out["left_out"]["own_patient"]
    assert counted["left_out"]["own_patient"].startswith("kept")
    text = fundus("evaluate", "--index", "cases", "--queries", queries, "-k", 4, cwd=tmp_path)
    assert "left out of results: query_photo: a query photo that is itself in the index; own_patient: the other photos" in text.stdout
