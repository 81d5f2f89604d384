"""Re-embedding an index for a new model, so that no index is stranded by an upgrade."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import pseudonym
from .dicom import Frame, looks_like_dicom
from .dicom import frames as dicom_frames
from .disk import build_aside
from .errors import ImageError
from .inputs import identify
from .model import Model, load_model
from .reader import Reader
from .records import Case
from .store import Store, VectorSpec


@dataclass
class RebuildReport:
    """What `rebuild` did: the new index's path, the cases carried over, and those it could not
    re-embed because their photo is gone or its content changed (sha256 differs)."""

    path: Path
    rebuilt: int
    missing: list[Case]
    changed: list[Case]
    unreadable: list[tuple[Case, str]]


def photo_of(case: Case) -> str | Frame:
    """The input a case's photo is read from: its file, or the frame of a multi-frame DICOM file."""
    if "frame" in case.metadata and isinstance(case.metadata["frame"], int) and looks_like_dicom(Path(case.path)):
        frames = dicom_frames(case.path)
        return frames[case.metadata["frame"] - 1]
    return case.path


def spec_of(model: Model) -> VectorSpec:
    """What vectors an index for `model` holds."""
    return VectorSpec(model.dim, model.fingerprint, model.name, model.scale, model.weights_fingerprint)


def rebuild(
    old: str | Path,
    new: str | Path,
    model: Model | str | Path | None = None,
    *,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> RebuildReport:
    """A new index at `new` with every case of `old` re-embedded by `model` (None: the bundled one).

    Each case whose photo is still at its path with the same content (sha256) is embedded again
    and keeps its key, grade, metadata, date added and history; the others are listed in the
    report. `old` is only read; the new index is built aside and renamed into place when complete.
    """
    m = model if isinstance(model, Model) else load_model(model)
    new = Path(new)
    src = Reader.open(old)
    try:
        cases, history, info = src.cases(), src.history(), src.info
        old_key = pseudonym.key_text(src.path, info)
    finally:
        src.close()

    def build(staging: Path) -> RebuildReport:
        report = RebuildReport(new, 0, [], [], [])
        todo = []
        for case in cases:
            if case.path is None or not Path(case.path).is_file():
                report.missing.append(case)
                continue
            try:
                sha, _ = identify(photo_of(case))
            except ImageError as err:
                report.unreadable.append((case, err.reason))
                continue
            (todo if sha == case.sha256 else report.changed).append(case)
        dst = Store.create(staging, spec_of(m), dtype=info.get("dtype", "f16"), root=info.get("root"))
        try:
            if old_key is not None:  # the same patients keep their pseudonyms in the new index
                pseudonym.give(dst.path, old_key)
            rows, keep = [], []
            for batch in m.iter_embed([photo_of(c) for c in todo], batch_size=batch_size, check=False):
                report.unreadable += [(todo[i], err.reason) for i, err in zip(batch.failed, batch.errors)]
                for i, vec, sha in zip(batch.positions, batch.vectors, batch.sha256):
                    c = todo[i]
                    if sha != c.sha256:  # changed since it was identified above
                        report.changed.append(c)
                        continue
                    rows.append((i, dst.stored_path(c.path), c.sha256, c.grade, json.dumps(c.metadata, default=str), vec))
                    keep.append((c.key, c.added))
                if progress is not None:
                    progress(len(batch.positions) + len(batch.errors))
            dst.insert(rows, keep)
            kept = {k for k, _ in keep}
            dst.record([c for c in history if c.key in kept])
        finally:
            dst.close()
        report.rebuilt = len(rows)
        return report

    return replace(build_aside(new, "rebuilding", build), path=new)
