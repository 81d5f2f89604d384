"""The input gate: fundus photographs pass, other pictures are refused with a reason, everywhere."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFilter

import fundus_sdk
from benchmarks.non_fundus import non_fundus_set
from fundus_sdk.cli import main
from fundus_sdk.errors import Exit
from fundus_sdk.gate import Gate, NotFundusError, Signals, UngradableWarning, calibrate
from tests.shared import FIXTURES, RETINA, eyepacs_sample
from training.camera import simulated_raw

CAT = FIXTURES / "chelsea.jpg"


def dark_retina() -> Image.Image:
    """The CC0 photo at 12% of its exposure: still a fundus photograph, with few grey levels left."""
    return Image.fromarray((np.asarray(Image.open(RETINA).convert("RGB").resize((512, 512))) * 0.12).astype(np.uint8))


@pytest.fixture(scope="module")
def model():
    m = fundus_sdk.load_model()
    assert m.gate is not None, "the bundled model must carry a gate calibration (python -m export.gate)"
    return m


def test_fundus_photos_pass_and_other_pictures_are_refused(model, eyepacs_dir):
    photos = [p for p, _ in eyepacs_sample(40)]
    rng = np.random.default_rng(0)
    raw = [simulated_raw(Image.open(p), rng) for p in photos[:10]]
    accepted = model.check([*photos, *raw, RETINA])
    assert all(v.fundus for v in accepted), [v.summary() for v in accepted if not v.fundus]
    others = non_fundus_set()
    refused = [name for name, v in zip(others, model.check(list(others.values()))) if not v.fundus]
    assert len(refused) >= 0.95 * len(others), sorted(set(others) - set(refused))


def test_each_refusal_says_why(model):
    grey = Image.open(RETINA).convert("L").convert("RGB")
    cat, flat = model.check([grey, CAT])[0], model.check(Image.new("RGB", (300, 300), (200, 90, 30)))[0]
    assert not cat.fundus and "no colour" in cat.summary()
    assert not model.check(CAT)[0].fundus
    assert not flat.fundus and flat.fundus_score < 0.5
    assert model.check(RETINA)[0].fundus_score > 0.5


def test_gradability_flags_blur_and_underexposure(model):
    photo = Image.open(RETINA).convert("RGB").resize((512, 512))
    sharp, blurred, dark = model.check([photo, photo.filter(ImageFilter.GaussianBlur(8)), dark_retina()])
    assert sharp.gradable and sharp.gradability > 0.5
    assert not blurred.gradable and any("focus" in r for r in blurred.reasons), blurred
    assert dark.fundus and not dark.gradable and any("underexposed" in r for r in dark.reasons), dark
    assert blurred.gradability < 0.5 and dark.gradability < 0.5


def test_calibration_survives_the_trip_through_the_model_file(model):
    gate = Gate.from_json(model.gate.to_json())
    vectors = model.embed([RETINA, CAT])
    assert np.allclose(gate.distance(vectors), model.gate.distance(vectors), rtol=1e-5)
    assert gate.limits == model.gate.limits


def test_index_refuses_a_cat_names_it_and_stores_gradability(tmp_path, model):
    with fundus_sdk.Index.create(tmp_path / "ix", model=model) as ix:
        with pytest.raises(NotFundusError, match="chelsea.jpg: not a fundus photograph"):
            ix.add([RETINA, CAT], [{"grade": 0}, {"grade": 1}])
        assert len(ix) == 0  # one atomic change: nothing half-added
        refused = []
        keys = ix.add([RETINA, CAT], [{"grade": 0}, {"grade": 1}], on_error=refused.append)
        assert keys[1] is None and [e.source for e in refused] == [str(CAT)]
        case = ix.get(keys[0])
        assert 0.5 < case.metadata["gradability"] <= 1.0
        forced = ix.add([CAT], check=False)
        assert forced[0] is not None and "gradability" not in ix.get(forced[0]).metadata


def test_search_refuses_a_non_fundus_query_and_warns_on_an_ungradable_one(tmp_path, model):
    with fundus_sdk.Index.create(tmp_path / "ix", model=model) as ix:
        ix.add([RETINA], [{"grade": 0}])
        with pytest.raises(NotFundusError, match="not a fundus photograph"):
            ix.search(CAT)
        assert ix.search(CAT, check=False)  # the caller asked for it
        with pytest.warns(UngradableWarning, match="underexposed"):
            assert ix.search(dark_retina(), k=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ix.search(RETINA, k=1)[0].score > 0.99


def test_cli_names_rejected_files_and_carries_verdicts(tmp_path, model):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(RETINA, photos / "retina.jpg")
    shutil.copy(CAT, photos / "cat.jpg")
    runner = CliRunner()
    out = tmp_path / "e.jsonl"
    result = runner.invoke(main, ["embed", str(photos), "-o", str(out), "-q"])
    assert result.exit_code == Exit.PARTIAL, result.output
    assert "cat.jpg: not a fundus photograph" in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"].endswith("retina.jpg") for r in rows] == [True]
    assert rows[0]["verdict"]["fundus"] and 0 < rows[0]["verdict"]["gradability"] <= 1
    result = runner.invoke(main, ["embed", str(photos), "-o", str(out), "-q", "--no-check"])
    assert result.exit_code == Exit.OK and len(out.read_text().splitlines()) == 2

    ix = tmp_path / "ix"
    assert runner.invoke(main, ["index", "create", str(ix)]).exit_code == 0
    result = runner.invoke(main, ["index", "add", str(ix), str(photos), "-q"])
    assert result.exit_code == Exit.PARTIAL and "cat.jpg: not a fundus photograph" in result.stderr
    assert "added 1 cases (1 failed)" in result.output
    result = runner.invoke(main, ["search", str(photos / "cat.jpg"), str(photos / "retina.jpg"), "--index", str(ix), "--json"])
    assert result.exit_code == Exit.PARTIAL and "cat.jpg: not a fundus photograph" in result.stderr
    answer = json.loads(result.stdout)
    assert [a["query"] for a in answer] == [str(photos / "retina.jpg")] and answer[0]["verdict"]["fundus"]
    dark = tmp_path / "dark.png"
    dark_retina().save(dark)
    result = runner.invoke(main, ["search", str(dark), "--index", str(ix)])
    assert result.exit_code == Exit.OK and "warning:" in result.stderr and "underexposed" in result.stderr


def noise_disc(seed: int = 0) -> Image.Image:
    """Red-tinted noise inside a disc on black: a fundus photo's framing and colour with no anatomy."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((512, 512, 1)) * [255, 90, 40]).astype(np.uint8)
    yy, xx = np.mgrid[-1:1:512j, -1:1:512j]
    return Image.fromarray(np.where((xx**2 + yy**2 < 0.9)[:, :, None], pixels, 0).astype(np.uint8))


def test_noise_framed_as_a_fundus_photo_is_refused_for_its_structure(model, eyepacs_dir):
    assert "structure" in model.gate.limits, "recalibrate the bundled model (python -m export.gate)"
    photos = [p for p, _ in eyepacs_sample(20)]
    photo_structure = [model.preprocess.load(p)[0].signals.structure for p in [*photos, RETINA]]
    assert min(photo_structure) > model.gate.limits["structure"]
    noise = model.check(noise_disc())[0]
    assert not noise.fundus and any(r.startswith("no vessel-scale structure") for r in noise.reasons), noise
    blurred = model.check(noise_disc().filter(ImageFilter.GaussianBlur(2)))[0]  # now it has structure
    assert not any(r.startswith("no vessel-scale structure") for r in blurred.reasons), blurred


def test_a_calibration_from_before_the_structure_signal_still_judges(model):
    old = Gate.from_json(model.gate.to_json())
    old.limits.pop("structure")
    old.typical.pop("structure")
    prepared = model.preprocess.load(noise_disc())[0]
    verdict = old.judge(model.run(prepared.pixels[None]), prepared.signals, model.preprocess.size // 2)
    assert not any(r.startswith("no vessel-scale structure") for r in verdict.reasons), verdict
    assert verdict.reasons, "the descriptor distance still refuses it"


def test_window_sums_match_the_sums_they_stand_for():
    from fundus_sdk.gate import _window_sums

    x = np.random.default_rng(0).random((2, 20, 23))
    for radius, sums in zip((1, 4), _window_sums(x)):
        padded = np.pad(x, ((0, 0), (radius, radius), (radius, radius)))
        k = 2 * radius + 1
        direct = np.array([[[padded[c, i : i + k, j : j + k].sum() for j in range(23)] for i in range(20)] for c in range(2)])
        assert np.allclose(sums, direct)


def signals_like(rng: np.random.Generator, n: int) -> list[Signals]:
    """Plausible fundus-photo signals with some spread."""
    return [
        Signals(colour=0.3 + 0.05 * rng.random(), surround=0.2 * rng.random(), focus=0.25 + 0.5 * rng.random(),
                range=240.0, clipped=0.0, fov_side=256, structure=0.8 + 0.2 * rng.random())
        for _ in range(n)
    ]  # fmt: skip


def test_limits_come_from_the_held_out_photos_and_hold_every_kind():
    """Photos a network learnt from sit closer than new ones: the limits must come from the held-out
    set, and a minority kind further out (raw-camera copies) sets the limit for its own rows."""
    rng = np.random.default_rng(0)
    dim = 16
    fit = rng.normal(size=(2000, dim))
    published, raw = rng.normal(size=(1000, dim)) * 1.3, rng.normal(size=(200, dim)) * 1.6  # both further than fit
    held = np.concatenate([published, raw])
    kinds = np.repeat([0, 1], [len(published), len(raw)])
    gate = calibrate(fit, held, signals_like(rng, len(held)), kinds)
    d = gate.distance(held)
    assert np.quantile(gate.distance(fit), 0.999) < np.quantile(d[kinds == 0], 0.99)  # fit rows would refuse ~1%+
    assert gate.limits["distance"] == pytest.approx(np.quantile(d[kinds == 1], 0.999))
    assert np.mean(d[kinds == 1] > gate.limits["distance"]) <= 0.005  # the raw kind is held to q, like the rest
    pooled = calibrate(fit, held, signals_like(np.random.default_rng(0), len(held)))
    assert pooled.limits["distance"] < gate.limits["distance"]  # pooled, the many published rows set it
    assert gate.photos == len(fit) + len(held)


def test_sharpness_beyond_any_photo_is_refused_and_older_calibrations_skip_it():
    rng = np.random.default_rng(1)
    fit = rng.normal(size=(500, 8))
    gate = calibrate(fit, fit[:300], signals_like(rng, 300))
    typical = Signals(colour=0.3, surround=0.1, focus=0.5, range=240, clipped=0, fov_side=256, structure=0.9)
    v = gate.mean[None]
    assert gate.judge(v, typical, 128).fundus
    sharp = replace(typical, focus=gate.limits["focus_high"] * 1.2)
    verdict = gate.judge(v, sharp, 128)
    assert not verdict.fundus and verdict.reasons[0].startswith("pixel-scale detail beyond a fundus photograph's")
    old = Gate.from_json(gate.to_json())
    old.limits.pop("focus_high")
    assert old.judge(v, sharp, 128).fundus


def test_a_star_field_is_refused_for_its_pixel_scale_detail(model, eyepacs_dir):
    assert "focus_high" in model.gate.limits, "recalibrate the bundled model (python -m export.gate)"
    photos = [p for p, _ in eyepacs_sample(20)]
    assert max(model.preprocess.load(p)[0].signals.focus for p in [*photos, RETINA]) < model.gate.limits["focus_high"]
    verdict = model.check(non_fundus_set()["skimage hubble_deep_field"])[0]
    assert not verdict.fundus and any(r.startswith("pixel-scale detail") for r in verdict.reasons), verdict
