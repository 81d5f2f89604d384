"""Patient pseudonyms: the same DICOM PatientID gives the same pseudonym within one index, and
the ID itself is never stored unless asked.

The secret (an HMAC key) is kept out of the database, which is copied and exported, in its own
owner-only file: the hospital's (FUNDUS_SDK_PSEUDONYM_KEY names it), else `pseudonym.key`
beside the index's database, made when first needed. Indexes before 0.4 held it in `info`:
it is moved out, its bytes overwritten.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from .atomic import FILE_MODE, write_atomically
from .errors import CaseIndexError
from .store import Store

PSEUDONYM_KEY = "pseudonym_key"  # where indexes before 0.4 kept it, in `info`
PSEUDONYM_FILE = "pseudonym.key"
PSEUDONYM_ENV = "FUNDUS_SDK_PSEUDONYM_KEY"


class Pseudonyms:
    """The pseudonyms of one index's patients (the secret read once, when first needed)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._secret: bytes | None = None

    def of(self, identifiers: dict[str, str], keep: bool) -> dict[str, Any]:
        """What a case may say of its patient: a pseudonym of the PatientID, the identifiers only if kept."""
        out: dict[str, Any] = dict(identifiers) if keep else {}
        if identifiers.get("PatientID"):
            if self._secret is None:
                self._secret = self._read_secret()
            out["patient_pseudonym"] = hmac.new(self._secret, identifiers["PatientID"].encode(), hashlib.sha256).hexdigest()[:20]
        return out

    def _read_secret(self) -> bytes:
        supplied = os.environ.get(PSEUDONYM_ENV)
        file = Path(supplied) if supplied else self.store.path / PSEUDONYM_FILE
        if not file.is_file():
            if supplied:
                raise CaseIndexError(f"{PSEUDONYM_ENV}={supplied}: no such key file")
            with self.store.writer():
                if not file.is_file():
                    with write_atomically(file, mode=FILE_MODE) as tmp:
                        tmp.write_text(self.store.info.get(PSEUDONYM_KEY) or secrets.token_hex(32))
                self.store.set_info(PSEUDONYM_KEY, None)
        try:
            return bytes.fromhex(file.read_text().strip())
        except ValueError:
            raise CaseIndexError(f"{file}: the pseudonym key must be hexadecimal text") from None


def key_text(index_dir: Path, info: dict[str, str]) -> str | None:
    """The secret of an index's own pseudonyms (its key file, or an older index's `info`), to carry over."""
    file = index_dir / PSEUDONYM_FILE
    return file.read_text() if file.is_file() else info.get(PSEUDONYM_KEY)


def give(index_dir: Path, text: str) -> None:
    """Make `text` the secret of a new index's pseudonyms, so that its patients keep theirs."""
    with write_atomically(index_dir / PSEUDONYM_FILE, mode=FILE_MODE) as tmp:
        tmp.write_text(text)
