"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def require_shared(path: Path) -> Path:
    """`path` if it exists; otherwise skip the test, or fail it when the CI variable is set."""
    if not path.exists():
        message = f"shared data missing: {path}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set: tests needing shared data must not skip)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """<repo>/../shared/data, the data kept outside the repository."""
    return require_shared(SHARED_DATA)


@pytest.fixture(scope="session")
def eyepacs_dir(shared_data: Path) -> Path:
    """The EyePACS photos: <repo>/../shared/data/eyepacs256 (images/ and labels.csv)."""
    return require_shared(shared_data / "eyepacs256" / "labels.csv").parent
