"""What an index stores of a case, apart from its vector: the typed records and the rules on metadata.

One place for the case's columns (`COLUMNS`), the fields the index derives itself (`RESERVED`)
and what metadata it refuses (`check_metadata`), so that the store, the filters, the label
reader and the command line agree.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

from .atomic import write_output
from .labels import ICDR, Scale

# A case's columns, in the order exports write them; its other fields are metadata (JSON).
COLUMNS = ("key", "path", "sha256", "grade", "added")
# Fields the index derives itself, never taken from the caller's metadata: the case's key, photo
# path, identity and date added, the input gate's gradability score, and the keyed pseudonym of a
# DICOM PatientID (a label column of that name would let anyone pose as a patient's photos).
RESERVED = ("key", "path", "sha256", "added", "gradability", "patient_pseudonym")
ON_CONFLICT = ("keep", "update")
CaseRef = Union[int, str, Path]  # a key, a sha256, or the path of the photo


def now() -> str:
    """The time of a change as the index records it (UTC, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Case:
    """A case as the index holds it: key (a stable identifier, never reused), where the photo
    is, its identity (sha256 of its content), grade and the rest of its metadata."""

    key: int
    path: str | None
    sha256: str | None
    grade: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    added: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The case as plain JSON-ready values."""
        return asdict(self)

    def value(self, name: str) -> Any:
        """A column's or a metadata field's value (None: the case has none)."""
        return getattr(self, name) if name in COLUMNS else self.metadata.get(name)


@dataclass
class Hit(Case):
    """One retrieved case: a Case and its cosine similarity to the query."""

    score: float = 0.0

    def __repr__(self) -> str:
        return f"Hit(key={self.key}, score={self.score:.3f}, grade={self.grade}, path={self.path!r})"

    def to_dict(self) -> dict[str, Any]:
        """The hit as plain JSON-ready values, key and score first."""
        return {"key": self.key, "score": self.score} | {k: v for k, v in asdict(self).items() if k not in ("key", "score")}


@dataclass(frozen=True)
class BatchHits(Sequence):
    """The hits of several queries, one list[Hit] per query in query order (`Index.search_batch`)."""

    hits: list[list[Hit]]

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i):  # type: ignore[override]
        return self.hits[i]

    def __repr__(self) -> str:
        return f"BatchHits({len(self.hits)} queries, {sum(map(len, self.hits))} hits)"

    def to_dict(self) -> list[list[dict[str, Any]]]:
        """The hits as plain JSON-ready values, a list per query."""
        return [[h.to_dict() for h in hits] for hits in self.hits]


@dataclass(frozen=True)
class Change:
    """One recorded change of a case's stored value (None: absent)."""

    key: int
    at: str
    field: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Conflict:
    """A photo added again with metadata other than the stored one."""

    key: int
    path: str | None
    field: str
    stored: Any
    given: Any

    def __str__(self) -> str:
        return f"{self.path or self.key}: stored {self.field} {self.stored!r}, given {self.given!r}"


def check_metadata(meta: dict[str, Any] | None, scale: Scale = ICDR) -> tuple[int | None, dict[str, Any]]:
    """(grade, the other fields) of one case's metadata; ValueError for what the index refuses
    (a grade off `scale`, the index's)."""
    extra = dict(meta or {})
    for name in extra:
        if not isinstance(name, str) or not name or '"' in name or any(ord(c) < 32 for c in name):
            raise ValueError(f"metadata field names must be non-empty text without quotes, got {name!r}")
        if name in RESERVED:
            raise ValueError(f"metadata field {name!r} is reserved: the index derives {', '.join(RESERVED)} itself")
    for name, value in extra.items():
        if not finite(value):
            raise ValueError(f"metadata field {name!r} holds a number that is not finite ({value!r}): JSON cannot store it")
    grade = extra.pop("grade", None)
    if grade is not None and grade not in scale:
        raise ValueError(f"grade must be an integer of the scale {scale.spec}, got {grade!r}")
    return (None if grade is None else int(grade)), extra


def finite(value: Any) -> bool:
    """Whether a metadata value holds no NaN or infinity, however deeply nested."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as a formula (OWASP: CSV injection)


def inert(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs: text starting like a formula gets a leading quote
    (OWASP's advice); numbers, negative ones included, are written as they are."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def write_cases(out: str | Path, cases: Sequence[Case], fields: Sequence[str], fmt: str | None = None) -> int:
    """Write cases (all but their vectors) as CSV or JSON Lines (by `fmt` or the suffix) to `out`
    ("-": standard output); returns how many. CSV columns: COLUMNS, then the metadata `fields`;
    text a spreadsheet would run as a formula is written inert."""
    fmt = fmt or ("jsonl" if Path(out).suffix.lower() in (".jsonl", ".json") else "csv")
    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"export format must be csv or jsonl, got {fmt!r}")
    with write_output(out) as f:
        if fmt == "jsonl":
            for case in cases:
                f.write(json.dumps(case.to_dict()) + "\n")
        else:
            extra = [name for name in fields if name not in COLUMNS]
            writer = csv.writer(f)
            writer.writerow([*COLUMNS, *extra])
            for c in cases:
                writer.writerow([inert(v) for v in (*(c.value(n) for n in COLUMNS), *(c.metadata.get(n, "") for n in extra))])
    return len(cases)
