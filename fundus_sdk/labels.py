"""Grading scales, and label files: a CSV with an `image` column, a `grade` column and any others."""

from __future__ import annotations

import csv
import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import FundusError


@dataclass(frozen=True)
class Scale:
    """An ordered grading scale: the consecutive integers low..high, optionally named.

    Why ordered: retrieval metrics give partial credit by distance on the scale (NDCG's gain is
    1 - |g_q - g_r| / span), and training's ordinal term pushes far grades further apart. A
    scale is declared with a training run (`--labels`), carried in the model's metadata
    (`labels.scale`) and in every index built with it. Label cells may hold a value or a name.
    """

    low: int = 0
    high: int = 4
    names: tuple[str, ...] = ()  # one per value, lowest first, when the classes are named

    def __post_init__(self) -> None:
        if self.high <= self.low:
            raise ValueError(f"a scale needs at least two grades, got {self.low}-{self.high}")
        if self.names and (len(self.names) != len(self) or len(set(self.names)) != len(self.names)):
            raise ValueError(f"a named scale needs {len(self)} distinct names, got {list(self.names)}")

    @classmethod
    def parse(cls, spec: str) -> "Scale":
        """"0-4" (integers 0 to 4), "-1-2", or named classes lowest first: "none,mild,severe" (0-2)."""
        text = spec.strip()
        if m := re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", text):
            return cls(int(m[1]), int(m[2]))
        names = tuple(n.strip() for n in text.split(","))
        if len(names) < 2 or not all(names) or any(re.fullmatch(r"-?\d+", n) for n in names):
            raise ValueError(f"a scale is LOW-HIGH (e.g. 0-4) or two or more names, lowest first "
                             f"(e.g. none,mild,severe), got {spec!r}")  # fmt: skip
        return cls(0, len(names) - 1, names)

    @property
    def spec(self) -> str:
        """The scale as `parse` reads it (how models and indexes record it)."""
        return ",".join(self.names) if self.names else f"{self.low}-{self.high}"

    @property
    def values(self) -> range:
        """The grades, lowest first."""
        return range(self.low, self.high + 1)

    @property
    def span(self) -> int:
        """Distance between the lowest and highest grade (NDCG's normaliser)."""
        return self.high - self.low

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __contains__(self, value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) in self.values

    def read(self, cell: str) -> int:
        """A label cell as a grade: a whole number on the scale, or one of its names."""
        text = cell.strip()
        if text in self.names:
            return self.low + self.names.index(text)
        whole = re.fullmatch(r"([-+]?\d+)\.0*", text)  # "2.0", as spreadsheets write 2
        try:
            value = int(whole[1] if whole else text)
        except ValueError:
            raise ValueError(f"grade {text!r} is not a whole number{' or a name' if self.names else ''} of the scale "
                             f"{self.spec}") from None  # fmt: skip
        if value not in self:
            raise ValueError(f"grade {value} is outside the scale {self.spec}")
        return value


ICDR = Scale(0, 4)  # the default: 0 no DR, 1 mild, 2 moderate, 3 severe, 4 proliferative DR
GRADES = ICDR.values
ICDR_NAMES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR")


def grade_name(grade: int | None, scale: Scale = ICDR) -> str:
    """A grade as a clinician reads it: "2 - moderate NPDR" on ICDR, the name on a named scale,
    the number otherwise; "ungraded" for None."""
    if grade is None:
        return "ungraded"
    if scale.names:
        return scale.names[grade - scale.low]
    return f"{grade} - {ICDR_NAMES[grade]}" if scale == ICDR and grade in ICDR else str(grade)


MAX_PROBLEMS = 50  # bad rows named in one LabelError (the count says how many more)


class LabelError(FundusError):
    """A label file that cannot be used; the message names the file and the row."""


def parse_value(text: str) -> Any:
    """A CSV cell or command-line value as what it means: an integer, a number, or text.

    "12" -> 12, "-3" -> -3, "0.5" -> 0.5, "left" -> "left". Numbers written with leading zeros
    ("007", an identifier, not a quantity) and anything else stay text, as does "" -> "".
    ValueError for a number beyond float range ("1e999"): it would be stored as infinity.
    """
    s = text.strip()
    if re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", s):
        return int(s)
    if re.fullmatch(r"[-+]?(0|[1-9][0-9]*)?\.[0-9]+([eE][-+]?[0-9]+)?|[-+]?(0|[1-9][0-9]*)[eE][-+]?[0-9]+", s):
        value = float(s)
        if not math.isfinite(value):
            raise ValueError(f"{s!r} is a number too large to store")
        return value
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
    csv_path: str | Path,
    image_root: str | Path | None = None,
    *,
    require_grade: bool = True,
    grade_column: bool = True,
    require_files: bool = True,
    scale: Scale = ICDR,
) -> list[Label]:
    """Rows of a label CSV, validated; one LabelError names every bad row.

    Errors: missing `image` (or, with require_grade, `grade`) column; a grade that is not on
    `scale` (a whole number in its range, "2.0" for 2, or one of its names); a number too large
    to store; with require_files, an image that does not exist under `image_root`.
    An empty grade cell is allowed (None) unless require_grade; the `grade` column itself is
    required unless `grade_column` is False too (cases ungraded on purpose).
    """
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else default_image_root(csv_path)
    try:
        f = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise LabelError(f"{csv_path}: cannot read label file ({exc.strerror or exc})") from exc
    with f:
        reader = csv.DictReader(f)
        needed = {"image", "grade"} if require_grade or grade_column else {"image"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise LabelError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}; found {reader.fieldnames}")
        labels, problems = [], []
        for line, row in enumerate(reader, start=2):
            where = f"row {line} ({row['image']!r})"
            raw = (row.get("grade") or "").strip()
            grade = None
            if raw or require_grade:
                try:
                    grade = scale.read(raw)
                except ValueError as exc:
                    problems.append(f"{where}: {exc}")
            path = root / row["image"]
            if require_files and not path.is_file():
                problems.append(f"{where}: image not found at {path}")
            extra = {k: v for k, v in row.items() if k not in ("image", "grade") and k is not None}
            for column, cell in extra.items():
                try:
                    parse_value(cell or "")
                except ValueError as exc:
                    problems.append(f"{where}, column {column!r}: {exc}")
            labels.append(Label(row["image"], path, grade, extra, line, str(csv_path)))
    if problems:  # every bad row at once, not one a run
        shown = "\n  ".join(problems[:MAX_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        raise LabelError(f"{csv_path}: {len(problems)} problem(s):\n  {shown}{more}")
    if not labels:
        raise LabelError(f"{csv_path}: no rows")
    return labels
