"""`fundus-sdk intake`: a real Storage SCP, real associations (pynetdicom), a real Orthanc.

Orthanc 1.10 listens on every interface, so the tests that start it run in a network namespace
of their own, with only the loopback up (`unshare --map-root-user --net`, which needs no root
where user namespaces are allowed): tests/pacs_world.py is that world.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.common import free_port
from fundus_sdk import Index
from tests.dicom_files import IDENTIFIERS, make_dicom, photo
from tests.shared import REPO, eyepacs_sample, require, unavailable

pynetdicom = require("pynetdicom", extra="pacs")


class Receiver:
    """`fundus-sdk intake` in its own process on loopback."""

    def __init__(self, index: Path, log: Path, *args: str) -> None:
        self.port, self.log = free_port(), log
        cmd = [sys.executable, "-m", "fundus_sdk", "intake", str(index), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stderr=log.open("w"), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while "listening on" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"intake did not start: {log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def send(port: int, files: list[Path], calling: str = "PACS1", called: str = "FUNDUS") -> list[int]:
    """C-STORE each file to the node at `port` in one association; the status of each."""
    from pydicom import dcmread

    ae = pynetdicom.AE(ae_title=calling)
    datasets = [dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def wait_for(condition, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def held(index: Path) -> int:
    with Index.open(index, read_only=True) as ix:
        return len(ix)


@pytest.fixture()
def photos(tmp_path) -> list[Path]:
    """Three OP instances (JPEG Baseline, JPEG 2000, RLE) of real photos, with every identifier set."""
    return [make_dicom(tmp_path / f"IM{i}", photo(p), syntax=s)
            for i, ((p, _), s) in enumerate(zip(eyepacs_sample(3, split="test"), ("jpeg-baseline", "jpeg2000", "rle")))]  # fmt: skip


def no_identifiers(index: Path) -> None:
    data = b"".join(p.read_bytes() for p in index.iterdir() if p.is_file())
    for value in IDENTIFIERS.values():
        assert value.encode() not in data, value


def test_received_photos_become_cases_without_identifiers_and_strangers_are_refused(tmp_path, photos):
    Index.create(tmp_path / "cases").close()
    receiver = Receiver(tmp_path / "cases", tmp_path / "intake.log", "--allow", "PACS1,CAMERA2")
    try:
        assert send(receiver.port, photos) == [0, 0, 0]
        assert send(receiver.port, photos[:1], calling="STRANGER") == []  # the association is rejected
        wait_for(lambda: held(tmp_path / "cases") == 3)
    finally:
        assert receiver.stop() == 0
    with Index.open(tmp_path / "cases", read_only=True) as ix:
        cases = list(ix)
        assert {c.metadata["sop_instance_uid"] for c in cases} == {_uid(p) for p in photos}
        assert all(c.metadata.get("patient_pseudonym") and "PatientName" not in c.metadata for c in cases)
        assert ix.search(photos[1], k=1)[0].metadata["sop_instance_uid"] == _uid(photos[1])
    no_identifiers(tmp_path / "cases")
    log = (tmp_path / "intake.log").read_text()
    assert "STRANGER" in log and "PACS1" in log and IDENTIFIERS["PatientName"] not in log


def _uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_a_photo_acknowledged_then_killed_before_its_commit_is_indexed_after_restart(tmp_path, photos):
    Index.create(tmp_path / "cases").close()
    receiver = Receiver(tmp_path / "cases", tmp_path / "first.log")
    assert send(receiver.port, photos[:1]) == [0]
    receiver.proc.kill()  # acknowledged a moment ago: embedding it takes longer than this
    receiver.proc.wait()
    assert held(tmp_path / "cases") == 0 and len(list((tmp_path / "cases" / "spool" / "photos").glob("*.dcm"))) == 1
    receiver = Receiver(tmp_path / "cases", tmp_path / "second.log")
    try:
        wait_for(lambda: held(tmp_path / "cases") == 1)
    finally:
        assert receiver.stop() == 0
    assert "not done before" in (tmp_path / "second.log").read_text()


def test_search_mode_writes_a_report_beside_the_spool_and_refusals_say_why(tmp_path, photos):
    with Index.create(tmp_path / "cases") as ix:
        ix.add([p for p, _ in eyepacs_sample(1, split="train", per_grade=True)])
    cat = make_dicom(tmp_path / "CAT", photo(REPO / "tests" / "fixtures" / "chelsea.jpg"), syntax="explicit")
    receiver = Receiver(tmp_path / "cases", tmp_path / "intake.log", "--mode", "search", "-k", "3")
    try:
        assert send(receiver.port, [photos[0], cat]) == [0, 0]
        reports = tmp_path / "cases" / "spool" / "reports"
        wait_for(lambda: (reports / f"{_uid(photos[0])}.html").exists())
        wait_for(lambda: (tmp_path / "cases" / "spool" / "refused" / f"{_uid(cat)}.txt").exists())
    finally:
        assert receiver.stop() == 0
    answer = json.loads((reports / f"{_uid(photos[0])}.json").read_text())
    assert len(answer["hits"]) == 3 and answer["verdict"]["fundus"]
    assert "not a fundus photograph" in (tmp_path / "cases" / "spool" / "refused" / f"{_uid(cat)}.txt").read_text()
    assert held(tmp_path / "cases") == 5  # search mode adds nothing


def orthanc_world(tmp_path: Path, photos: list[Path]) -> dict:
    """tests/pacs_world.py in a network namespace of its own: Orthanc, the intake, and the three
    ways a photo reaches Orthanc (REST, C-STORE, STOW-RS); what it found, as JSON."""
    if shutil.which("Orthanc") is None or shutil.which("unshare") is None:
        unavailable("needs Debian's orthanc and orthanc-dicomweb (.ci/run installs them) and unshare")
    Index.create(tmp_path / "cases").close()
    out = tmp_path / "world.json"
    cmd = ["unshare", "--map-root-user", "--net", "--", sys.executable, str(REPO / "tests" / "pacs_world.py"), str(tmp_path), str(out),
           *map(str, photos)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # starts a real PACS
def test_a_real_orthanc_forwards_photos_sent_by_rest_cstore_and_stow(tmp_path, photos):
    world = orthanc_world(tmp_path, photos)
    assert world["orthanc_instances"] == 3  # one photo by each way in
    assert world["forwarded"] == [True, True, True]
    assert world["cases"] == 3 and sorted(world["sop_uids"]) == sorted(map(_uid, photos))
    assert world["polled_seq"] > 0  # the change feed was read and remembered
    no_identifiers(tmp_path / "cases")
    assert world["interfaces"] == ["lo"]  # Orthanc never saw a network


def test_every_association_is_logged_and_the_pacs_administrator_is_told_what_to_enter(tmp_path):
    Index.create(tmp_path / "cases").close()
    receiver = Receiver(tmp_path / "cases", tmp_path / "intake.log", "--ae-title", "RETINA")
    try:
        ae = pynetdicom.AE(ae_title="ECHOER")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="RETINA")
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()
    finally:
        assert receiver.stop() == 0
    log = (tmp_path / "intake.log").read_text()
    assert "RETINA listening on 127.0.0.1" in log and "from ECHOER" in log


def test_the_database_names_no_patient_even_with_a_pseudonym_key(tmp_path, photos):
    """The pseudonym's secret lives beside the database, never in it."""
    Index.create(tmp_path / "cases").close()
    receiver = Receiver(tmp_path / "cases", tmp_path / "intake.log")
    try:
        assert send(receiver.port, photos[:1]) == [0]
        wait_for(lambda: held(tmp_path / "cases") == 1)
    finally:
        assert receiver.stop() == 0
    conn = sqlite3.connect(tmp_path / "cases" / "cases.sqlite")
    assert not conn.execute("SELECT * FROM info WHERE name LIKE '%pseudonym%'").fetchall()
