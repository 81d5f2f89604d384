"""Where the tests find their real data, and how they behave when it is missing.

EyePACS photos are never copied into the repository: tests read them from
../shared/data/eyepacs256 beside the checkout. Locally a missing folder skips those tests;
under CI (environment variable CI set) it fails them loudly.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
EYEPACS = REPO.parent / "shared" / "data" / "eyepacs256"
RETINA = FIXTURES / "retina.jpg"


def require_eyepacs() -> Path:
    """The EyePACS folder; fails under CI, skips elsewhere, when it is missing."""
    if (EYEPACS / "labels.csv").is_file():
        return EYEPACS
    message = f"{EYEPACS} is missing: tests read the EyePACS photos from ../shared beside the checkout"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def eyepacs_rows(split: str = "test") -> list[dict]:
    with open(require_eyepacs() / "labels.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def eyepacs_sample(n: int, split: str = "test", per_grade: bool = False) -> list[tuple[Path, int]]:
    """A fixed, deterministic sample of (path, grade): the first n rows, or n of each grade."""
    rows = eyepacs_rows(split)
    if per_grade:
        rows = [r for g in "01234" for r in [x for x in rows if x["grade"] == g][:n]]
    else:
        rows = rows[:n]
    return [(EYEPACS / "images" / r["image"], int(r["grade"])) for r in rows]
