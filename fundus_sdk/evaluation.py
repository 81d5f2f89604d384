"""How well an index retrieves for graded query photos: the metrics of fundus_sdk.metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import metrics
from .errors import CaseIndexError, OnError, error_policy
from .index import Index
from .labels import Label


def evaluate_index(
    index: Index,
    queries: Sequence[Label],
    k: int = 10,
    *,
    on_error: OnError = "raise",
    progress: Callable[[int], None] | None = None,
    batch_size: int = 16,
) -> dict:
    """Retrieval metrics (metrics.evaluate's report) of graded query photos against the index's
    graded cases.

    A query photo that is itself in the index (same content hash) never counts as its own hit.
    Unreadable queries go to `on_error` (as for embed); `progress(n)` after each batch.
    Raises CaseIndexError when the index holds no graded case, ValueError when no query was read.
    """
    failed = error_policy(on_error)
    scale = index.scale
    graded = {"grade": list(scale.values)}
    gallery = index.grades()
    if gallery.size == 0:
        raise CaseIndexError(f"{index.path} holds no graded cases")
    ranked, grades = [], []
    for batch in index.model.iter_embed([q.path for q in queries], batch_size=batch_size, check=False):
        for err in batch.errors:
            failed(err)
        # one search per batch, so the grade filter is computed once per batch
        batch_hits = index.search_batch(batch.vectors, k=k + 1, where=graded) if len(batch.positions) else []
        for pos, found, sha in zip(batch.positions, batch_hits, batch.sha256):
            hits = [h for h in found if h.sha256 != sha][:k]
            grade = queries[pos].grade
            # a gallery smaller than k: the missing ranks get a grade the whole scale away (no hit, zero gain)
            ranked.append([h.grade for h in hits] + [grade + scale.span] * (k - len(hits)))
            grades.append(grade)
        if progress is not None:
            progress(len(batch.positions) + len(batch.errors))
    if not grades:
        raise ValueError("no query photo could be read")
    return metrics.evaluate(np.array(grades), np.array(ranked), gallery, scale.span)
