"""Where the tests find their real data, and how they behave when it is missing.

EyePACS photos are never copied into the repository: tests (and benchmarks, where the location
is defined) read them from the folder named by FUNDUS_SDK_DATA, by default
../shared/data/eyepacs256 beside the checkout. Locally a missing folder skips those tests;
under CI (environment variable CI set) it fails them loudly.
"""

from __future__ import annotations

import csv
import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from benchmarks.common import EYEPACS, IDRID, REPO, RETINA  # noqa: F401 (the tests import REPO from here)
from fundus_sdk.labels import GRADES

FIXTURES = RETINA.parent


def require_eyepacs() -> Path:
    """The EyePACS folder; fails under CI, skips elsewhere, when it is missing."""
    return _require_data(EYEPACS, "EyePACS")


def require_idrid() -> Path:
    """The IDRiD folder (the second camera); fails under CI, skips elsewhere, when it is missing."""
    return _require_data(IDRID, "IDRiD")


def _require_data(folder: Path, name: str) -> Path:
    if (folder / "labels.csv").is_file():
        return folder
    unavailable(f"{folder} is missing: tests read the {name} photos from ../shared beside the checkout")


def eyepacs_rows(split: str = "test") -> list[dict]:
    with open(require_eyepacs() / "labels.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == split]


def eyepacs_sample(n: int, split: str = "test", per_grade: bool = False) -> list[tuple[Path, int]]:
    """A fixed, deterministic sample of (path, grade): the first n rows, or n of each grade."""
    rows = eyepacs_rows(split)
    if per_grade:
        rows = [r for g in GRADES for r in [x for x in rows if x["grade"] == str(g)][:n]]
    else:
        rows = rows[:n]
    return [(EYEPACS / "images" / r["image"], int(r["grade"])) for r in rows]


def require(module: str, extra: str = "train") -> ModuleType:
    """Import a module that a group of tests needs (torch for training and export, pydicom for
    DICOM): without it they are skipped with the reason locally, and fail under CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        unavailable(f"needs {module} (the {extra} extra: pip install -e '.[{extra}]'): {exc}")


def unavailable(message: str) -> NoReturn:
    """Skip the calling tests (locally) or fail them (under CI, which installs everything)."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)


def given(metadata: dict) -> dict:
    """A case's metadata as it was given: without the gradability the input gate measured (in [0, 1])."""
    assert 0 <= metadata.get("gradability", 0) <= 1
    return {k: v for k, v in metadata.items() if k != "gradability"}
