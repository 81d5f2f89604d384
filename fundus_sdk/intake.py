"""PACS intake: fundus photographs arriving by DICOM networking, indexed or answered (the `pacs`
extra: pynetdicom, with the decoders of the `dicom` extra).

A Storage SCP answers C-ECHO and accepts Ophthalmic Photography, VL Photographic and Secondary
Capture instances in the transfer syntaxes cameras send. Each instance is written to the spool
(aside, fsynced, renamed, the folder fsynced) *before* success is returned, so an acknowledged
photo survives any crash: on start, every spooled photo not yet done is processed again. A
worker thread then passes each photo through the same pipeline as `index add` (the gate, no
identifiers unless asked, the patient's pseudonym, eye and UIDs from the header) or, in search
mode, answers it with a report beside it (HTML and JSON) for a viewer to pick up.

Spool layout: `photos/<SOP Instance UID>.dcm` (acknowledged), `refused/` (what the gate or the
decoder refused, each with a `.txt` reason), `reports/` (search mode), `orthanc.seq` (the last
change of an Orthanc change feed read). Associations are logged with the calling AE title and
address, never a patient identifier.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import re
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from .atomic import FILE_MODE, fsync_dir, write_atomically
from .errors import ImageError
from .index import Index

log = logging.getLogger(__name__)

# What a fundus camera or a PACS sends: the SOP classes accepted and their transfer syntaxes.
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
}
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
MODES = ("index", "search")
SAFE_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class IntakeConfig:
    """Where photos go and how: the index, the spool folder, index or search mode, the callers
    allowed (empty: any), whether identifiers are kept, and k for search mode."""

    index: str
    spool: str
    mode: str = "index"
    ae_title: str = "FUNDUS"
    allow: tuple[str, ...] = ()
    keep_identifiers: bool = False
    k: int = 10


class Intake:
    """The spool and the worker that indexes (or answers) what arrives in it."""

    def __init__(self, config: IntakeConfig) -> None:
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {config.mode!r}")
        self.config = config
        self.spool = Path(config.spool)
        for part in ("photos", "refused", "reports"):
            (self.spool / part).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.index = Index.open(config.index, read_only=config.mode == "search")
        self.index.model  # noqa: B018 (loaded now: the first photo is not kept waiting)
        self.todo: queue.Queue[Path | None] = queue.Queue()
        self.done = threading.Event()
        self.worker = threading.Thread(target=self._work, name="intake", daemon=True)

    # -- the spool -----------------------------------------------------------------------------

    def spool_instance(self, data: bytes, sop_uid: str) -> Path:
        """Write one received instance to the spool durably and queue it; returns its path."""
        name = sop_uid if SAFE_UID.match(sop_uid or "") else f"instance-{time.time_ns()}"
        path = self.spool / "photos" / f"{name}.dcm"
        with write_atomically(path, mode=FILE_MODE) as tmp:  # fsynced file and folder before it is acknowledged
            tmp.write_bytes(data)
        self.todo.put(path)
        return path

    def pending(self) -> list[Path]:
        """Spooled photos not done yet (after a crash: those acknowledged but not committed)."""
        photos = sorted((self.spool / "photos").glob("*.dcm"))
        if self.config.mode == "search":
            return [p for p in photos if not (self.spool / "reports" / f"{p.stem}.json").exists()]
        return [p for p in photos if not self.index.holds(p)]

    def start(self) -> None:
        """Queue what an earlier run left, then start the worker."""
        left = self.pending()
        if left:
            log.info("intake: %d spooled photos not done before; processing them first", len(left))
        for path in left:
            self.todo.put(path)
        self.worker.start()

    def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        self.todo.put(None)
        self.worker.join()

    def _work(self) -> None:
        while (path := self.todo.get()) is not None:
            try:
                self.process(path)
            except Exception:  # one photo must not stop the intake: it stays spooled for the next start
                log.exception("intake: %s failed; it stays in the spool", path.name)
            self.todo.task_done()
        self.done.set()

    def process(self, path: Path) -> None:
        """Index one spooled photo (or answer it, in search mode); a refused one is moved aside with its reason."""
        errors: list[ImageError] = []
        if self.config.mode == "index":
            self.index.add([path], on_error=errors.append, keep_identifiers=self.config.keep_identifiers)
        else:
            (result,) = self.index.query([path], self.config.k, on_error=errors.append)
            if result.ok:
                self.report(path, result)
        for err in errors:
            self.refuse(path, err.reason)
        log.info("intake: %s %s", path.name, "refused" if errors else ("indexed" if self.config.mode == "index" else "answered"))

    def refuse(self, path: Path, reason: str) -> None:
        refused = self.spool / "refused" / path.name
        with write_atomically(refused.with_suffix(".txt")) as tmp:
            tmp.write_text(reason + "\n")
        path.replace(refused)
        fsync_dir(path.parent)

    def report(self, path: Path, result) -> None:
        """The answer for a viewer: `reports/<uid>.json` (hits and verdict) and `.html` (the visual report)."""
        from .report import Report

        out = self.spool / "reports"
        Report.build(self.index, [(path, result.hits)]).write_html(out / f"{path.stem}.html")
        with write_atomically(out / f"{path.stem}.json", mode=FILE_MODE) as tmp:
            tmp.write_text(json.dumps(result.to_dict(), indent=2))

    # -- DICOM networking ----------------------------------------------------------------------

    def application_entity(self) -> AE:
        """The Storage SCP: C-ECHO, and C-STORE of the accepted SOP classes and transfer syntaxes."""
        ae = AE(ae_title=self.config.ae_title)
        ae.add_supported_context(Verification)
        for uid in SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        if self.config.allow:
            ae.require_calling_aet = list(self.config.allow)  # others are rejected at association
        return ae

    def handlers(self) -> list:
        def stored(event) -> int:
            try:
                data = event.encoded_dataset()  # preamble, file meta and the dataset as sent
                sop_uid = str(event.request.AffectedSOPInstanceUID)
                self.spool_instance(data, sop_uid)
            except OSError as exc:  # a full disk: the sender keeps the photo and retries
                log.error("intake: could not spool an instance from %s (%s)", event.assoc.requestor.ae_title, exc)
                return 0xA700  # Out of Resources
            return 0x0000

        def association(event) -> None:
            who = event.assoc.requestor
            log.info("intake: association %s from %s at %s:%s", event.event.name, who.ae_title, who.address, who.port)

        return [(evt.EVT_C_STORE, stored), (evt.EVT_ACCEPTED, association), (evt.EVT_REJECTED, association),
                (evt.EVT_RELEASED, association), (evt.EVT_ABORTED, association)]  # fmt: skip

    def serve(self, host: str, port: int, block: bool = True):
        """Listen for associations (blocking, or in the background: returns the server)."""
        self.start()
        return self.application_entity().start_server((host, port), block=block, evt_handlers=self.handlers())

    # -- a PACS's change feed --------------------------------------------------------------------

    def poll_orthanc(self, url: str, stop: threading.Event, every: float = 2.0) -> None:
        """Fetch the new instances Orthanc reports in its change feed (`/changes`), from the last
        change seen before (remembered in the spool), until `stop` is set."""
        seq_file = self.spool / "orthanc.seq"
        since = int(seq_file.read_text()) if seq_file.exists() else 0
        while not stop.is_set():
            changes = get_json(f"{url}/changes?since={since}&limit=100")
            for change in changes.get("Changes", []):
                if change.get("ChangeType") == "NewInstance":
                    self.fetch_orthanc(url, change["ID"])
            if changes.get("Last", since) != since:
                since = changes["Last"]
                with write_atomically(seq_file) as tmp:
                    tmp.write_text(str(since))
            if changes.get("Done", True):
                stop.wait(every)

    def fetch_orthanc(self, url: str, instance: str) -> None:
        data = urllib.request.urlopen(f"{url}/instances/{instance}/file", timeout=60).read()
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        if str(ds.get("SOPClassUID", "")) not in SOP_CLASSES:
            log.info("intake: Orthanc instance %s is not a photograph (SOP class %s); skipped", instance, ds.get("SOPClassUID"))
            return
        self.spool_instance(data, str(ds.SOPInstanceUID))


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def parse_allow(values: Sequence[str]) -> tuple[str, ...]:
    """AE titles as given (repeatable and comma-separated)."""
    return tuple(t.strip() for v in values for t in v.split(",") if t.strip())
