"""API keys for `fundus-sdk serve`: each has an id (named in the audit log) and a scope; the key
file holds only each key's sha256, so a copy of the file lets nobody in.

A key reads `fsk_<id>_<secret>`. Scopes: "search" (search, read cases and the index's
description) and "admin" (everything, the metrics included).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import FILE_MODE, write_atomically
from .errors import FundusError
from .records import now

SCOPES = ("search", "admin")
PREFIX = "fsk_"


class KeyFileError(FundusError):
    """A key file that cannot be read, or a scope that does not exist."""


@dataclass(frozen=True)
class Key:
    """One key as the key file stores it: never the key itself."""

    id: str
    scope: str
    sha256: str
    created: str

    def allows(self, scope: str) -> bool:
        """Whether this key may use an endpoint of `scope` (admin may use every one)."""
        return self.scope == "admin" or self.scope == scope


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def read_keys(file: str | Path) -> list[Key]:
    """The keys of a key file (one JSON object per line); an absent file holds none."""
    path = Path(file)
    if not path.exists():
        return []
    try:
        return [Key(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a fundus-sdk key file ({exc})") from None


def create_key(file: str | Path, scope: str) -> tuple[Key, str]:
    """A new key of `scope`, stored (as its hash) in `file` (made owner-only); returns the key
    record and the key itself, which is shown once and can never be read back."""
    if scope not in SCOPES:
        raise KeyFileError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    keys = read_keys(file)
    key_id = secrets.token_hex(4)
    secret = f"{PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    key = Key(key_id, scope, digest(secret), now())
    with write_atomically(file, mode=FILE_MODE) as tmp:
        tmp.write_text("".join(json.dumps(asdict(k)) + "\n" for k in [*keys, key]))
    return key, secret


def authenticate(keys: list[Key], presented: str) -> Key | None:
    """The key a presented secret is, or None (compared in constant time)."""
    if not presented.startswith(PREFIX):
        return None
    key_id = presented[len(PREFIX) :].split("_", 1)[0]
    wanted = digest(presented)
    for key in keys:
        if key.id == key_id and hmac.compare_digest(key.sha256, wanted):
            return key
    return None
