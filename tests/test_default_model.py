"""The bundled default model: it loads, its metadata is sane, and it retrieves by DR grade.

The quality check embeds a fixed subset of the EyePACS split (every 8th training photo as the
gallery, every 6th test photo as queries) and checks that what the model's metadata (and so
MODEL_CARD.md) claims for the full test split holds there within sampling tolerance, and that
it beats chance by most of the claimed margin.
"""

import json

import numpy as np
import pytest
from PIL import Image

import fundus_sdk
from fundus_sdk import contract, metrics
from tests.shared import RETINA, eyepacs_rows, require_eyepacs
from training.camera import enhanced_like_eyepacs


@pytest.fixture(scope="module")
def model():
    return fundus_sdk.load_model()


def test_metadata_describes_a_trained_model(model):
    meta = model.metadata
    assert model.dim == 512 and meta[contract.PRECISION] == "fp16-weights"  # two 256-d networks, float16 weights
    assert meta[contract.BACKBONE] == "tf_efficientnet_lite0+tf_efficientnet_lite1" and meta[contract.MIRRORING] == "feature"
    members = json.loads(meta["model.members"])
    assert [m["weight"] for m in members] == pytest.approx([0.6, 0.4])  # chosen on validation (docs/ABLATIONS.md)
    assert model.explains  # the report's heatmaps
    data = json.loads(meta[contract.TRAINING_DATA])
    assert data["train"]["images"] > 4000  # trained on the EyePACS training split
    assert "EyePACS" in meta[contract.LICENCE] and "research" in meta[contract.LICENCE]
    claimed = model.metrics()
    assert claimed["n_queries"] == 1343 and claimed["k"] == 10
    # issue 14's ship gate, as recorded in the file (measured through the runtime)
    assert claimed["micro"]["mHR"] >= 0.72 and claimed["macro"]["mHR"] >= 0.42
    per_grade, chance = claimed["per_grade"]["mHR"], claimed["chance"]["per_grade"]["mHR"]
    assert per_grade["2"] >= 0.31 and all(per_grade[g] >= 10 * chance[g] for g in ("3", "4"))


@pytest.fixture(scope="module")
def subset_report(model) -> dict:
    require_eyepacs()
    gallery = eyepacs_rows("train")[::8]
    queries = eyepacs_rows("test")[::6]
    root = require_eyepacs() / "images"
    g = model.embed([root / r["image"] for r in gallery], batch_size=32)
    q = model.embed([root / r["image"] for r in queries], batch_size=32)
    g_grades = np.array([int(r["grade"]) for r in gallery])
    q_grades = np.array([int(r["grade"]) for r in queries])
    return metrics.retrieval_report(q, g, q_grades, g_grades, 10)


@pytest.mark.slow  # embeds a fixed subset of EyePACS: a minute
def test_retrieval_on_a_fixed_subset_matches_the_claims(model, subset_report):
    claimed = model.metrics()
    for avg in ("micro", "macro"):
        # 224 queries against a gallery 1/8 the size: the spread measured between such subsets
        # is a few hundredths; 0.08 keeps the test stable while catching a broken model
        assert subset_report[avg]["mHR"] >= claimed[avg]["mHR"] - 0.08, (avg, subset_report[avg], claimed[avg])


def test_retrieval_beats_chance_by_most_of_the_claimed_margin(model, subset_report):
    claimed = model.metrics()
    for avg in ("micro", "macro"):
        margin = subset_report[avg]["mHR"] - subset_report["chance"][avg]["mHR"]
        claimed_margin = claimed[avg]["mHR"] - claimed["chance"][avg]["mHR"]
        assert claimed_margin > 0.05  # the shipped model is meaningfully better than chance
        assert margin >= 0.5 * claimed_margin, (avg, margin, claimed_margin)


def test_a_raw_photo_finds_its_eyepacs_style_copy_first(model):
    """The raw CC0 photo (1411 px, natural colour) and a copy enhanced the way the training set
    was (squashed to 256 px, channels equalised): the copy must be its nearest neighbour among
    ~190 unrelated test-split photos, by a clear margin."""
    root = require_eyepacs() / "images"
    raw = Image.open(RETINA).convert("RGB")
    others = [root / r["image"] for r in eyepacs_rows("test")[::7]]
    v = model.embed([raw, enhanced_like_eyepacs(raw), *others], batch_size=32)
    sims = v[1:] @ v[0]
    assert sims[0] > sims[1:].max() + 0.05, (sims[0], sims[1:].max())
