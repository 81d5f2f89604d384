"""Finding image files in the paths a user gives."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})


def find_images(paths: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """Image files named directly, plus those inside the folders given, in a stable order.

    Files named directly are kept whatever their suffix (the user asked for them); files
    found in folders are kept when their suffix is one of IMAGE_SUFFIXES.
    Raises FileNotFoundError for a path that does not exist.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found += sorted(f for f in p.glob(pattern) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    seen: set[Path] = set()
    return [f for f in found if not (f in seen or seen.add(f))]
