"""`fundus-sdk intake`: receive fundus photos from a PACS or camera by DICOM (the `pacs` extra)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path

import click

from .common import handle_errors


@click.command()
@click.argument("index_dir", metavar="INDEX", type=click.Path(file_okay=False, exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Where to listen (0.0.0.0: every interface).")
@click.option("--port", default=11112, show_default=True, type=click.IntRange(1, 65535), help="The DICOM port.")
@click.option("--ae-title", default="FUNDUS", show_default=True, help="This node's AE title, as the PACS administrator enters it.")
@click.option("--mode", type=click.Choice(["index", "search"]), default="index", show_default=True,
              help="index: add each photo as a case; search: answer it with a report in the spool's reports/.")
@click.option("--allow", multiple=True, metavar="AE", help="Calling AE titles accepted (repeatable or comma-separated; default: any).")
@click.option("--spool", type=click.Path(file_okay=False), help="Where received photos are kept (default: INDEX/spool).")
@click.option("--from-orthanc", "orthanc", metavar="URL", help="Also fetch new instances from this Orthanc's change feed.")
@click.option("--keep-identifiers", is_flag=True, help="Store patient names, IDs and other identifiers (default: a pseudonym only).")
@click.option("-k", default=10, show_default=True, type=click.IntRange(1, 100), help="Search mode: cases per photo.")
@handle_errors
def intake(index_dir, host, port, ae_title, mode, allow, spool, orthanc, keep_identifiers, k) -> None:
    """Receive fundus photographs by DICOM (C-STORE) into the index INDEX, or answer them.

    Each instance is written to the spool and fsynced before it is acknowledged; on start,
    photos acknowledged but not yet indexed are indexed first. Ctrl-C or SIGTERM stops taking
    associations, finishes the photos received, then exits.

    \b
    Example:
      fundus-sdk intake cases/ --host 0.0.0.0 --port 11112 --ae-title FUNDUS --allow PACS1
    """
    try:
        from ..intake import Intake, IntakeConfig, parse_allow
    except ImportError as exc:
        raise click.ClickException(f"intake needs the pacs extra ({exc.name} is missing): pip install 'fundus-sdk[pacs]'") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    config = IntakeConfig(str(index_dir), str(spool or Path(index_dir) / "spool"), mode, ae_title, parse_allow(allow),
                          keep_identifiers, k)  # fmt: skip
    receiver = Intake(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = receiver.serve(host, port, block=False)
    poller = threading.Thread(target=receiver.poll_orthanc, args=(orthanc.rstrip("/"), stop), daemon=True) if orthanc else None
    if poller:
        poller.start()
    click.echo(f"intake: {ae_title} listening on {host}:{port} ({mode} mode, spool {config.spool})", err=True)
    stop.wait()
    server.shutdown()
    if poller:
        poller.join(timeout=10)
    receiver.stop()
    click.echo("intake: stopped; every photo received was processed", err=True)
