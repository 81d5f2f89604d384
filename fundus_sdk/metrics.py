"""Retrieval metrics for graded cases: one definition for training, evaluation and the CLI.

For a query of grade g and its top-k retrieved grades r_1..r_k (rel_i = [r_i == g]):
- mHR@k:  precision@k, sum(rel_i) / k (the paper's "mean hit ratio");
- mAP@k:  the paper's code: sum_i P@i * rel_i / k;
- AP@k:   standard: sum_i P@i * rel_i / min(k, R), R = gallery cases of grade g;
- NDCG@k: graded gain 1 - |g - r_i| / span (grades are ordinal; span = 4 on ICDR 0-4), ideal
  ranking from the gallery.
Each is averaged per query grade, over all queries ("micro") and over grades ("macro"), and
reported next to its expected value under random ranking ("chance", from the class priors).
"""

from __future__ import annotations

import numpy as np

from .labels import ICDR
from .tables import format_table

METRICS = ("mHR", "mAP", "AP", "NDCG")


def gain(query_grade: np.ndarray, grades: np.ndarray, span: int = ICDR.span) -> np.ndarray:
    """Graded relevance 1 - |g_q - g_r| / span, span being the scale's (fundus_sdk.labels.Scale)."""
    return 1.0 - np.abs(np.asarray(query_grade) - np.asarray(grades)) / span


def per_query(
    query_grades: np.ndarray, ranked: np.ndarray, gallery_grades: np.ndarray, span: int = ICDR.span
) -> dict[str, np.ndarray]:
    """Each metric for each query; `ranked` (n_queries, k) holds retrieved grades, best first."""
    q = np.asarray(query_grades)[:, None]
    ranked = np.asarray(ranked)
    k = ranked.shape[1]
    rel = (ranked == q).astype(np.float64)
    ranks = np.arange(1, k + 1)
    prec_at_i = np.cumsum(rel, axis=1) / ranks
    hits_weighted = (prec_at_i * rel).sum(axis=1)
    gallery_grades = np.asarray(gallery_grades)
    n_relevant = (gallery_grades[None, :] == q).sum(axis=1)
    discount = 1.0 / np.log2(ranks + 1)
    dcg = (gain(q, ranked, span) * discount).sum(axis=1)
    ideal = np.empty(len(q))
    for g in np.unique(q):
        best = np.sort(gain(g, gallery_grades, span))[::-1][:k]
        ideal[q[:, 0] == g] = (best * discount[: len(best)]).sum()
    return {
        "mHR": rel.mean(axis=1),
        "mAP": hits_weighted / k,
        "AP": hits_weighted / np.maximum(np.minimum(k, n_relevant), 1),
        "NDCG": dcg / np.maximum(ideal, 1e-12),
    }


def chance_per_grade(
    gallery_grades: np.ndarray, k: int, grades: list[int], span: int = ICDR.span
) -> dict[str, dict[int, float]]:
    """Expected metrics under random ranking, per query grade (large-gallery approximation)."""
    gallery_grades = np.asarray(gallery_grades)
    values = np.unique(gallery_grades)
    priors = np.array([(gallery_grades == v).mean() for v in values])
    i = np.arange(1, k + 1)
    out: dict[str, dict[int, float]] = {m: {} for m in METRICS}
    for g in grades:
        p = float((gallery_grades == g).mean())
        ap = float(((p + (i - 1) * p * p) / i).sum() / k)
        out["mHR"][g] = p
        out["mAP"][g] = ap
        out["AP"][g] = ap
        out["NDCG"][g] = float((priors * gain(g, values, span)).sum())
    return out


def evaluate(query_grades, ranked, gallery_grades, span: int = ICDR.span) -> dict:
    """Per-grade, micro and macro averages of every metric, and the same for chance; `span` is
    the grading scale's (NDCG's gain).

    Returns {"k", "n_queries", "grades", "per_grade": {metric: {grade: v}}, "micro": {metric: v},
    "macro": {metric: v}, "chance": {"per_grade", "micro", "macro"}, "query_counts": {grade: n}}.
    """
    query_grades = np.asarray(query_grades)
    ranked = np.asarray(ranked)
    k = ranked.shape[1]
    scores = per_query(query_grades, ranked, gallery_grades, span)
    grades = sorted(int(g) for g in np.unique(query_grades))
    counts = {g: int((query_grades == g).sum()) for g in grades}
    per_grade = {m: {g: float(scores[m][query_grades == g].mean()) for g in grades} for m in METRICS}
    chance = chance_per_grade(gallery_grades, k, grades, span)
    weights = np.array([counts[g] for g in grades], dtype=np.float64) / len(query_grades)
    return {
        "k": k,
        "n_queries": int(len(query_grades)),
        "grades": grades,
        "query_counts": counts,
        "per_grade": per_grade,
        "micro": {m: float(scores[m].mean()) for m in METRICS},
        "macro": {m: float(np.mean(list(per_grade[m].values()))) for m in METRICS},
        "chance": {
            "per_grade": chance,
            "micro": {m: float((weights * [chance[m][g] for g in grades]).sum()) for m in METRICS},
            "macro": {m: float(np.mean([chance[m][g] for g in grades])) for m in METRICS},
        },
    }


def rank_exact(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most cosine-similar gallery rows for each query (unit vectors), exact."""
    sims = queries @ gallery.T
    k = min(k, gallery.shape[0])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def retrieval_report(
    queries: np.ndarray, gallery: np.ndarray, query_grades, gallery_grades, k: int, span: int = ICDR.span
) -> dict:
    """Rank the gallery for each query (exact cosine) and evaluate: the report of `evaluate`."""
    gallery_grades = np.asarray(gallery_grades)
    ranked = rank_exact(queries, gallery, k)
    return evaluate(query_grades, gallery_grades[ranked], gallery_grades, span)


def format_report(report: dict) -> str:
    """A plain-text table: one row per grade, then micro and macro, each with chance."""
    k = report["k"]
    chance = report["chance"]
    rows = [
        [g, report["query_counts"][g]]
        + [f"{v:.3f}" for m in METRICS for v in (report["per_grade"][m][g], chance["per_grade"][m][g])]
        for g in report["grades"]
    ] + [
        [name, report["n_queries"]] + [f"{v:.3f}" for m in METRICS for v in (report[name][m], chance[name][m])]
        for name in ("micro", "macro")
    ]
    return format_table(["grade", "n", *(h for m in METRICS for h in (f"{m}@{k}", "chance"))], rows)
