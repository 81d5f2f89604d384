"""The grade scale, and label files: a CSV with an `image` column, a `grade` column and any others."""

from __future__ import annotations

import csv
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import FundusError

GRADES = range(5)  # the ICDR scale: 0 no DR, 1 mild, 2 moderate, 3 severe, 4 proliferative DR
GRADE_RANGE = f"{GRADES[0]}-{GRADES[-1]}"


def is_grade(value: object) -> bool:
    """Whether `value` is a grade of the scale (an integer, not a bool or a float)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) in GRADES


class LabelError(FundusError):
    """A label file that cannot be used; the message names the file and the row."""


def parse_value(text: str) -> Any:
    """A CSV cell or command-line value as what it means: an integer, a number, or text.

    "12" -> 12, "-3" -> -3, "0.5" -> 0.5, "left" -> "left". Numbers written with leading zeros
    ("007", an identifier, not a quantity) and anything else stay text, as does "" -> "".
    """
    s = text.strip()
    if re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", s):
        return int(s)
    if re.fullmatch(r"[-+]?(0|[1-9][0-9]*)?\.[0-9]+([eE][-+]?[0-9]+)?|[-+]?(0|[1-9][0-9]*)[eE][-+]?[0-9]+", s):
        return float(s)
    return s


@dataclass(frozen=True)
class Label:
    image: str  # as written in the CSV
    path: Path  # resolved against the image root
    grade: int | None
    fields: dict[str, str] = field(default_factory=dict)  # every other column, as written
    line: int = 0  # the row's number in the CSV (the header is row 1)
    source: str = ""  # the CSV's path

    @property
    def where(self) -> str:
        """Where the row is, for messages: file, row number and image."""
        return f"{self.source}, row {self.line} ({self.image!r})"

    def metadata(self) -> dict[str, Any]:
        """The row as case metadata: the grade and every other non-empty column, typed (parse_value)."""
        meta = {k: parse_value(v) for k, v in self.fields.items() if v is not None and v.strip() != ""}
        return meta | ({"grade": self.grade} if self.grade is not None else {})


def match_labels(files: Sequence[Path], rows: Sequence[Label], folders: Sequence[Path] = ()) -> list[Label | None]:
    """The label row of each photo (None where it has none), never a guess.

    A row matches a photo when its image resolves to the photo's file (against the CSV's image
    root), or equals the photo's path relative to one of `folders` (the folders being added).
    A row naming a bare file name matches a photo of that name only when exactly one photo has
    it. LabelError, naming both, when one photo fits two rows or one bare name fits two photos;
    rows naming the same image twice are refused with their line numbers.
    """
    by_image: dict[str, Label] = {}
    for row in rows:
        key = PurePosixPath(row.image.replace("\\", "/")).as_posix()
        if key in by_image:
            raise LabelError(f"{row.source}: rows {by_image[key].line} and {row.line} both label {row.image!r}")
        by_image[key] = row
    by_file = {row.path.resolve(): row for row in rows}
    resolved = [f.resolve() for f in files]
    names: dict[str, list[Path]] = {}
    for f in files:
        names.setdefault(f.name, []).append(f)
    matched: list[Label | None] = []
    for f, real in zip(files, resolved):
        found = {id(r): r for r in [by_file.get(real)] if r is not None}
        for folder in folders:
            try:
                rel = real.relative_to(Path(folder).resolve()).as_posix()
            except ValueError:
                continue
            if rel in by_image:
                found[id(by_image[rel])] = by_image[rel]
        if not found and "/" not in f.name and f.name in by_image:
            row = by_image[f.name]
            if len(names[f.name]) > 1:
                others = " and ".join(str(p) for p in names[f.name][:2])
                raise LabelError(f"{row.where}: the bare name {row.image!r} fits {others}; give the path instead")
            found[id(row)] = row
        if len(found) > 1:
            lines = " and ".join(str(r.line) for r in found.values())
            raise LabelError(f"{f}: fits rows {lines} of {rows[0].source}")
        matched.append(next(iter(found.values()), None))
    return matched


def default_image_root(csv_path: Path) -> Path:
    """Images are looked up in an `images/` folder beside the CSV if there is one, else beside it."""
    images = csv_path.parent / "images"
    return images if images.is_dir() else csv_path.parent


def read_labels(
    csv_path: str | Path, image_root: str | Path | None = None, *, require_grade: bool = True, require_files: bool = True
) -> list[Label]:
    """Rows of a label CSV, validated; fails at once naming the row.

    Errors: missing `image` (or, with require_grade, `grade`) column; a grade that is not a
    whole number of the scale (GRADES); with require_files, an image that does not exist under `image_root`.
    An empty grade cell is allowed (None) unless require_grade.
    """
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else default_image_root(csv_path)
    try:
        f = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise LabelError(f"{csv_path}: cannot read label file ({exc.strerror or exc})") from exc
    with f:
        reader = csv.DictReader(f)
        needed = {"image", "grade"} if require_grade else {"image"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise LabelError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}; found {reader.fieldnames}")
        labels = []
        for line, row in enumerate(reader, start=2):
            where = f"{csv_path}, row {line} ({row['image']!r})"
            raw = (row.get("grade") or "").strip()
            grade = None
            if raw or require_grade:
                try:
                    grade = int(raw)
                except ValueError:
                    raise LabelError(f"{where}: grade {raw!r} is not a whole number") from None
                if grade not in GRADES:
                    raise LabelError(f"{where}: grade {grade} is outside {GRADE_RANGE}")
            path = root / row["image"]
            if require_files and not path.is_file():
                raise LabelError(f"{where}: image not found at {path}")
            extra = {k: v for k, v in row.items() if k not in ("image", "grade") and k is not None}
            labels.append(Label(row["image"], path, grade, extra, line, str(csv_path)))
    if not labels:
        raise LabelError(f"{csv_path}: no rows")
    return labels
