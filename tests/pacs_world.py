"""A world for tests/test_intake.py, run in a network namespace of its own: the
loopback up and nothing else, a real Orthanc, and `fundus-sdk intake` beside it.

    unshare --map-root-user --net -- python tests/pacs_world.py WORKDIR OUT.json PHOTO.dcm PHOTO.dcm PHOTO.dcm

WORKDIR holds the index `cases`; the three photos reach Orthanc by REST, C-STORE and STOW-RS, and
Orthanc forwards each to the intake (a DicomModalities entry); the intake also reads Orthanc's
change feed. OUT.json says what happened, for the test to judge.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from fundus_sdk import Index

HTTP, DICOM, INTAKE = 8042, 4242, 11112


def request(path: str, data: bytes | None = None, content_type: str = "application/json") -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{HTTP}{path}", data=data, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=60) as response:
        return response.read()


def wait(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the world did not settle")
        time.sleep(0.3)


def up(check) -> bool:
    try:
        return bool(check())
    except OSError:
        return False


def main(work: Path, out: Path, photos: list[Path]) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    interfaces = sorted(line.split(":")[1].strip().split("@")[0] for line in subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout.splitlines())  # fmt: skip
    config = {
        "Name": "test-pacs", "StorageDirectory": str(work / "orthanc"), "IndexDirectory": str(work / "orthanc"),
        "HttpPort": HTTP, "DicomPort": DICOM, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "StableAge": 1, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomModalities": {"fundus": ["FUNDUS", "127.0.0.1", INTAKE]},
    }  # fmt: skip
    (work / "orthanc.json").write_text(json.dumps(config))
    orthanc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=(work / "orthanc.log").open("w"))
    intake = subprocess.Popen(
        [sys.executable, "-m", "fundus_sdk", "intake", str(work / "cases"), "--port", str(INTAKE), "--allow", "ORTHANC",
         "--from-orthanc", f"http://127.0.0.1:{HTTP}"],
        stdout=subprocess.DEVNULL, stderr=(work / "intake.log").open("w"),
    )  # fmt: skip
    try:
        wait(lambda: up(lambda: request("/system")))
        wait(lambda: "listening on" in (work / "intake.log").read_text())
        rest, cstore, stow = photos
        request("/instances", rest.read_bytes(), "application/dicom")
        ae = AE(ae_title="CAMERA")
        ds = dcmread(cstore)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", DICOM, ae_title="ORTHANC")
        status = int(assoc.send_c_store(ds).Status)
        assoc.release()
        assert status == 0, f"C-STORE to Orthanc: status {status:#06x}"
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + stow.read_bytes()
                + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
        request("/dicom-web/studies", body, f'multipart/related; type="application/dicom"; boundary={boundary}')
        instances = json.loads(request("/instances"))
        forwarded = []
        for instance in instances:
            answer = json.loads(request("/modalities/fundus/store", json.dumps({"Resources": [instance], "Synchronous": True}).encode()))
            forwarded.append(answer.get("FailedInstancesCount", 1) == 0)

        def cases() -> list:
            with Index.open(work / "cases", read_only=True) as ix:
                return list(ix)

        wait(lambda: len(cases()) >= 3)
        seq = work / "cases" / "spool" / "orthanc.seq"
        wait(lambda: seq.exists() and int(seq.read_text()) > 0)
        found = cases()
    finally:
        intake.send_signal(signal.SIGTERM)
        intake.wait(timeout=120)
        orthanc.terminate()
        orthanc.wait(timeout=60)
    out.write_text(json.dumps({
        "orthanc_instances": len(instances), "forwarded": forwarded, "cases": len(found),
        "sop_uids": [c.metadata.get("sop_instance_uid") for c in found], "polled_seq": int(seq.read_text()),
        "interfaces": interfaces,
    }))  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]])
