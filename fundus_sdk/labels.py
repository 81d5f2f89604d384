"""The grade scale, and label files: a CSV with an `image` column, a `grade` column and any others."""

from __future__ import annotations

import csv
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FundusError

GRADES = range(5)  # the ICDR scale: 0 no DR, 1 mild, 2 moderate, 3 severe, 4 proliferative DR
GRADE_RANGE = f"{GRADES[0]}-{GRADES[-1]}"


def is_grade(value: object) -> bool:
    """Whether `value` is a grade of the scale (an integer, not a bool or a float)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) in GRADES


class LabelError(FundusError):
    """A label file that cannot be used; the message names the file and the row."""


@dataclass(frozen=True)
class Label:
    image: str  # as written in the CSV
    path: Path  # resolved against the image root
    grade: int | None
    fields: dict[str, str] = field(default_factory=dict)  # every other column


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
            labels.append(Label(row["image"], path, grade, extra))
    if not labels:
        raise LabelError(f"{csv_path}: no rows")
    return labels
