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
    own_patient: bool = False,
) -> dict:
    """Retrieval metrics (metrics.evaluate's report) of graded query photos against the index's
    graded cases.

    A query photo that is itself in the index (same content hash) never counts as its own hit.
    Where a query's label row names its `patient`, that patient's other photos in the index
    (the fellow eye, other visits) are left out of its results too, since they flatter the
    figures; `own_patient=True` keeps them. The report says which under "left_out".
    Unreadable queries go to `on_error` (as for embed); `progress(n)` after each batch.
    Raises CaseIndexError when the index holds no graded case, ValueError when no query was read.
    """
    failed = error_policy(on_error)
    scale = index.scale
    graded = {"grade": list(scale.values)}
    gallery = index.grades()
    if gallery.size == 0:
        raise CaseIndexError(f"{index.path} holds no graded cases")
    ranked, grades, patients = [], [], 0
    for batch in index.model.iter_embed([q.path for q in queries], batch_size=batch_size, check=False):
        for err in batch.errors:
            failed(err)
        named = [None if own_patient else (queries[pos].fields.get("patient") or "").strip() or None
                 for pos in batch.positions]  # fmt: skip
        # the queries naming no patient in one search per batch (the grade filter computed once); the
        # others each leave out their own patient's photos, compared by value (filters.by_value)
        plain = [i for i, patient in enumerate(named) if patient is None]
        batch_hits = dict(zip(plain, index.search_batch(batch.vectors[plain], k=k + 1, where=graded))) if plain else {}
        for i, (pos, vec, sha, patient) in enumerate(zip(batch.positions, batch.vectors, batch.sha256, named)):
            found = batch_hits[i] if patient is None else index.search(vec, k=k + 1, where=graded, exclude={"patient": patient})
            patients += patient is not None
            hits = [h for h in found if h.sha256 != sha][:k]
            grade = queries[pos].grade
            # a gallery smaller than k: the missing ranks get a grade the whole scale away (no hit, zero gain)
            ranked.append([h.grade for h in hits] + [grade + scale.span] * (k - len(hits)))
            grades.append(grade)
        if progress is not None:
            progress(len(batch.positions) + len(batch.errors))
    if not grades:
        raise ValueError("no query photo could be read")
    report = metrics.evaluate(np.array(grades), np.array(ranked), gallery, scale.span)
    report["left_out"] = {
        "query_photo": "a query photo that is itself in the index",
        "own_patient": f"the other photos of the query's patient ({patients} queries name their patient)"
        if patients else ("kept (own_patient=True)" if own_patient else "no query names its patient"),
    }
    return report
