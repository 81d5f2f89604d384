"""Shared pytest fixtures (the data they find is described in tests/shared.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.shared import require_eyepacs


@pytest.fixture(scope="session")
def eyepacs_dir() -> Path:
    """The EyePACS photos beside the checkout (images/ and labels.csv); fails under CI if missing."""
    return require_eyepacs()
