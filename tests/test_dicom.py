"""DICOM input: every transfer syntax fundus cameras use, frames, headers, and no patient identity leaks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fundus_sdk
from fundus_sdk import dicom
from fundus_sdk.cli import main
from fundus_sdk.errors import Exit, ImageError
from fundus_sdk.inputs import decode, find_images, identify
from tests.shared import RETINA, eyepacs_sample, require

require("pydicom", extra="dicom")
from tests.dicom_files import IDENTIFIERS, SECONDARY_CAPTURE, SYNTAXES, make_dicom, photo  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return fundus_sdk.load_model()


@pytest.fixture(scope="module")
def rgb():
    return photo(RETINA)


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_every_transfer_syntax_decodes_to_the_photo(tmp_path, rgb, syntax, model):
    path = make_dicom(tmp_path / "photo.dcm", rgb, syntax=syntax)
    decoded = decode(path)
    assert decoded.format == "DICOM" and decoded.metadata["eye"] == "left"
    pixels = np.asarray(decoded.image)
    if syntax == "jpeg-baseline":  # lossy: compare with what the JPEG itself holds
        assert np.abs(pixels.astype(int) - rgb).mean() < 3
    else:
        assert np.array_equal(pixels, rgb)
        png = tmp_path / "photo.png"
        Image.fromarray(rgb).save(png)
        a, b = model.embed([path, png])
        assert float(a @ b) >= 0.999


@pytest.mark.parametrize("photometric", ["YBR_FULL", "MONOCHROME2", "MONOCHROME1"])
def test_colour_spaces_and_grey(tmp_path, rgb, photometric):
    pixels = np.asarray(decode(make_dicom(tmp_path / "p.dcm", rgb, photometric=photometric)).image).astype(int)
    expected = rgb if photometric == "YBR_FULL" else np.repeat(rgb.mean(axis=2, keepdims=True).round(), 3, axis=2)
    assert np.abs(pixels - expected).max() <= 1  # YBR_FULL round trip: one level of rounding


def test_recognised_by_content_not_by_name(tmp_path, rgb):
    named = make_dicom(tmp_path / "IM000001", rgb)  # PACS exports often have no suffix
    disguised = make_dicom(tmp_path / "scan.jpg", rgb)
    assert decode(disguised).format == "DICOM" and decode(named.read_bytes()).format == "DICOM"
    (tmp_path / "notes").write_text("not an image")
    assert sorted(p.name for p in find_images([tmp_path])) == ["IM000001", "scan.jpg"]


def test_multi_frame_is_one_photo_per_frame(tmp_path, rgb, model):
    frames = [rgb, rgb[:, ::-1].copy(), np.rot90(rgb).copy()]
    path = make_dicom(tmp_path / "series.dcm", frames)
    with pytest.raises(ImageError, match="3 frames"):
        decode(path)
    inputs = dicom.frames(path)
    assert [str(f) for f in inputs] == [f"{path} [frame {i}/3]" for i in (1, 2, 3)]
    assert [np.array_equal(np.asarray(decode(f).image), want) for f, want in zip(inputs, frames)] == [True] * 3
    with fundus_sdk.Index.create(tmp_path / "ix", model=model) as ix:
        keys = ix.add(inputs, [{"grade": 1}] * 3)
        assert len(set(keys)) == 3
        assert [ix.get(k).metadata["frame"] for k in keys] == [1, 2, 3]
        assert {ix.get(k).path for k in keys} == {str(path.resolve())}


def test_identity_is_the_decoded_pixels(tmp_path, rgb, model):
    """The same photo, arriving twice in files with other headers and syntaxes, is one case."""
    a = make_dicom(tmp_path / "a.dcm", rgb, syntax="explicit")
    b = make_dicom(tmp_path / "b.dcm", rgb, syntax="rle", identifiers=False)
    c = make_dicom(tmp_path / "c.dcm", rgb[::-1].copy())
    assert identify(a)[0] == identify(b)[0] == decode(a).sha256 != identify(c)[0]
    with fundus_sdk.Index.create(tmp_path / "ix", model=model) as ix:
        keys = ix.add([a, b, c])
        assert keys[0] == keys[1] != keys[2] and len(ix) == 2


def test_patient_identity_never_enters_the_index_unless_kept(tmp_path, model, eyepacs_dir):
    photos = [photo(p, 256) for p, _ in eyepacs_sample(3)]
    files = [make_dicom(tmp_path / f"{i}.dcm", p, patient_id="MRN-55501234" if i < 2 else "MRN-1") for i, p in enumerate(photos)]
    files.append(make_dicom(tmp_path / "sc.dcm", photo(RETINA, 256), sop_class=SECONDARY_CAPTURE, laterality=None))
    ix_dir = tmp_path / "ix"
    with fundus_sdk.Index.create(ix_dir, model=model) as ix:
        keys = ix.add(files)
        cases = [ix.get(k) for k in keys]
        ix.export(tmp_path / "export.jsonl")
    pseudonyms = [c.metadata["patient_pseudonym"] for c in cases]
    assert pseudonyms[0] == pseudonyms[1] != pseudonyms[2]  # one patient's photos group together
    assert cases[0].metadata["eye"] == "left" and "eye" not in cases[3].metadata
    assert cases[0].metadata["manufacturer"] == "Acme Optics" and cases[0].metadata["acquisition_date"] == "2026-11-24"
    secret_words = [*IDENTIFIERS.values(), "MRN-1", "Doe", "Kildare", "Elsewhere", "19470215"]
    stored = b"".join(p.read_bytes() for p in ix_dir.iterdir() if p.is_file()) + (tmp_path / "export.jsonl").read_bytes()
    assert [w for w in secret_words if w.encode() in stored] == []

    kept_dir = tmp_path / "kept"
    with fundus_sdk.Index.create(kept_dir, model=model) as ix:
        kept = ix.get(ix.add(files[:1], keep_identifiers=True)[0])
    assert kept.metadata["PatientName"] == IDENTIFIERS["PatientName"]
    assert kept.metadata["patient_pseudonym"] != pseudonyms[0]  # a pseudonym is keyed per index


def test_bad_dicom_files_are_per_file_errors(tmp_path, rgb, model):
    good = make_dicom(tmp_path / "good.dcm", rgb)
    no_pixels = make_dicom(tmp_path / "nopixels.dcm", rgb)
    import pydicom

    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    unsupported = make_dicom(tmp_path / "mpeg.dcm", rgb, syntax="jpeg-ls")
    ds = pydicom.dcmread(unsupported)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.save_as(unsupported)
    failed = []
    vectors = model.embed([good, no_pixels, truncated, unsupported], on_error=failed.append)
    assert np.isfinite(vectors[0]).all() and np.isnan(vectors[1:]).all()
    reasons = {e.source.split("/")[-1]: e.reason for e in failed}
    assert "without pixel data" in reasons["nopixels.dcm"]
    assert "mpeg.dcm" in reasons and "truncated.dcm" in reasons


def test_cli_indexes_a_folder_of_dicom_files(tmp_path, rgb):
    folder = tmp_path / "pacs"
    folder.mkdir()
    make_dicom(folder / "IM0001", rgb)
    make_dicom(folder / "IM0002.dcm", [rgb[::-1].copy(), rgb[:, ::-1].copy()])
    runner = CliRunner()
    ix = tmp_path / "ix"
    assert runner.invoke(main, ["index", "create", str(ix)]).exit_code == 0
    result = runner.invoke(main, ["index", "add", str(ix), str(folder), "-q", "--keep-identifiers"])
    assert result.exit_code == Exit.OK, result.output
    assert "added 3 cases" in result.output
    exported = tmp_path / "cases.jsonl"
    assert runner.invoke(main, ["index", "export", str(ix), "-o", str(exported)]).exit_code == 0
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert sorted(r["metadata"].get("frame", 0) for r in rows) == [0, 1, 2]
    assert all(r["metadata"]["PatientName"] == IDENTIFIERS["PatientName"] for r in rows)
    result = runner.invoke(main, ["search", str(folder / "IM0001"), "--index", str(ix), "-k", "1", "--json"])
    assert result.exit_code == Exit.OK and json.loads(result.stdout)[0]["hits"][0]["score"] > 0.99


def test_without_the_extra_a_dicom_file_names_the_extra(tmp_path, rgb):
    path = make_dicom(tmp_path / "photo.dcm", rgb)
    code = (
        "import sys; sys.modules['pydicom'] = None\n"
        "from fundus_sdk.inputs import decode\n"
        f"try:\n    decode({str(path)!r})\nexcept Exception as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "photo.dcm: a DICOM file; install the dicom extra" in out and "fundus-sdk[dicom]" in out


def test_rebuild_re_embeds_each_frame(tmp_path, rgb, model):
    path = make_dicom(tmp_path / "series.dcm", [rgb, rgb[::-1].copy()])
    with fundus_sdk.Index.create(tmp_path / "old", model=model) as ix:
        ix.add(dicom.frames(path), [{"grade": 2}, {"grade": 3}])
    report = fundus_sdk.rebuild(tmp_path / "old", tmp_path / "new", model)
    assert report.rebuilt == 2 and not report.unreadable
    with fundus_sdk.Index.open(tmp_path / "new", read_only=True) as ix:
        assert sorted((c.metadata["frame"], c.grade) for c in ix) == [(1, 2), (2, 3)]


def test_the_pseudonym_secret_stays_out_of_the_database(tmp_path, model, monkeypatch):
    import hashlib
    import hmac
    import sqlite3
    import stat

    from fundus_sdk.pseudonym import PSEUDONYM_ENV, PSEUDONYM_FILE, PSEUDONYM_KEY

    dcm = make_dicom(tmp_path / "a.dcm", photo(RETINA, 256), patient_id="MRN-42")
    with fundus_sdk.Index.create(tmp_path / "ix", model=model) as ix:
        (key,) = ix.add([dcm])
        pseudonym = ix.get(key).metadata["patient_pseudonym"]
    key_file = tmp_path / "ix" / PSEUDONYM_FILE
    secret = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert secret.encode() not in (tmp_path / "ix" / "cases.sqlite").read_bytes()
    assert hmac.new(bytes.fromhex(secret), b"MRN-42", hashlib.sha256).hexdigest()[:20] == pseudonym

    old = tmp_path / "old"  # an index from before: the secret in its database, moved out when first needed
    with fundus_sdk.Index.create(old, model=model):
        pass
    db = sqlite3.connect(old / "cases.sqlite")
    db.execute("INSERT INTO info VALUES (?, ?)", (PSEUDONYM_KEY, secret))
    db.commit()
    db.close()
    with fundus_sdk.Index.open(old, model=model) as ix:
        assert ix.get(ix.add([dcm])[0]).metadata["patient_pseudonym"] == pseudonym
    assert (old / PSEUDONYM_FILE).read_text().strip() == secret and secret.encode() not in (old / "cases.sqlite").read_bytes()

    hospital = tmp_path / "hospital.key"  # a key the hospital supplies: the same pseudonyms in every index
    hospital.write_text("ab" * 32)
    monkeypatch.setenv(PSEUDONYM_ENV, str(hospital))
    with fundus_sdk.Index.create(tmp_path / "third", model=model) as ix:
        expected = hmac.new(bytes.fromhex("ab" * 32), b"MRN-42", hashlib.sha256).hexdigest()[:20]
        assert ix.get(ix.add([dcm])[0]).metadata["patient_pseudonym"] == expected
    assert not (tmp_path / "third" / PSEUDONYM_FILE).exists()
