"""The retrieval metrics against values computed by hand on a toy ranking."""

import math

import numpy as np
import pytest

from fundus_sdk import metrics

# gallery: two grade-0, three grade-1, one grade-2 cases
GALLERY = np.array([0, 0, 1, 1, 1, 2])


def test_one_query_by_hand():
    # query of grade 1 retrieves grades 1, 0, 1, 2 (hits at ranks 1 and 3)
    report = metrics.evaluate([1], [[1, 0, 1, 2]], GALLERY)
    assert report["micro"]["mHR"] == pytest.approx(2 / 4)
    assert report["micro"]["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 4)  # paper: sum P@i at hits / k
    assert report["micro"]["AP"] == pytest.approx((1 / 1 + 2 / 3) / 3)  # standard: / min(k, R=3)
    dcg = 1 + 0.75 / math.log2(3) + 1 / math.log2(4) + 0.75 / math.log2(5)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4) + 0.75 / math.log2(5)  # gallery gains 1,1,1,.75
    assert report["micro"]["NDCG"] == pytest.approx(dcg / ideal)
    assert report["chance"]["micro"]["mHR"] == pytest.approx(3 / 6)


def test_per_grade_micro_macro_and_chance():
    # grade 0 query: perfect; two grade 2 queries: one hit in two, none
    report = metrics.evaluate([0, 2, 2], [[0, 0], [2, 1], [0, 1]], GALLERY)
    assert report["per_grade"]["mHR"] == {0: pytest.approx(1.0), 2: pytest.approx(0.25)}
    assert report["micro"]["mHR"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert report["macro"]["mHR"] == pytest.approx((1.0 + 0.25) / 2)
    # chance mHR of a grade is its share of the gallery; micro weights by query counts
    assert report["chance"]["per_grade"]["mHR"] == {0: pytest.approx(2 / 6), 2: pytest.approx(1 / 6)}
    assert report["chance"]["micro"]["mHR"] == pytest.approx((2 / 6 + 2 * 1 / 6) / 3)
    assert report["query_counts"] == {0: 1, 2: 2}


def test_chance_matches_random_rankings():
    rng = np.random.default_rng(0)
    gallery = rng.choice(5, size=4000, p=[0.73, 0.07, 0.15, 0.03, 0.02])
    queries = rng.choice(5, size=3000, p=[0.73, 0.07, 0.15, 0.03, 0.02])
    ranked = gallery[rng.integers(0, len(gallery), size=(len(queries), 10))]
    report = metrics.evaluate(queries, ranked, gallery)
    for m in metrics.METRICS:
        assert report["micro"][m] == pytest.approx(report["chance"]["micro"][m], abs=0.02)


def test_rank_exact_orders_by_cosine():
    gallery = np.eye(4, dtype=np.float32)
    query = np.array([[0.1, 0.9, 0.4, 0.0]], dtype=np.float32)
    assert metrics.rank_exact(query, gallery, 3).tolist() == [[1, 2, 0]]


def test_format_report_has_every_grade_and_average():
    text = metrics.format_report(metrics.evaluate([0, 2], [[0, 2], [2, 2]], GALLERY))
    rows = [line.split()[0] for line in text.splitlines()[2:]]  # under the header and its rule
    assert rows == ["0", "2", "micro", "macro"]


def test_retrieval_report_ranks_then_evaluates():
    gallery = np.eye(4, dtype=np.float32)
    queries = np.array([[0.9, 0.1, 0, 0], [0, 0, 0.2, 0.98]], dtype=np.float32)
    report = metrics.retrieval_report(queries, gallery, [0, 3], np.array([0, 1, 2, 3]), k=1)
    assert report["micro"]["mHR"] == 1.0
    wrong = metrics.retrieval_report(queries, gallery, [1, 2], np.array([0, 1, 2, 3]), k=1)
    assert wrong["micro"]["mHR"] == 0.0


def test_one_table_formatter_aligns_and_speaks_markdown():
    from fundus_sdk.tables import format_table

    text = format_table(["name", "n"], [["a", 1], ["longer", 22]])
    lines = text.splitlines()
    assert lines[1] == "------  --" and lines[3] == "longer  22" and lines[2] == "a        1"
    assert format_table(["a", "b"], [[1, 2]], markdown=True).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
