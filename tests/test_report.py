"""The visual report: attention heatmaps from the bundled model, the HTML file in a real headless
Chromium (every image decoded, heatmaps visible and different, no network request) and the PNG."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fundus_sdk
from fundus_sdk.errors import Exit, ModelError
from fundus_sdk.report import DISCLAIMER
from tests.browser import render
from tests.shared import FIXTURES, eyepacs_sample, require

K = 4


@pytest.fixture(scope="module")
def model() -> fundus_sdk.Model:
    return fundus_sdk.load_model()


@pytest.fixture(scope="module")
def cases(tmp_path_factory, eyepacs_dir) -> Path:
    """An index of 25 graded EyePACS training photos (5 per grade), with eye and patient metadata."""
    root = tmp_path_factory.mktemp("report") / "cases"
    sample = eyepacs_sample(5, split="train", per_grade=True)
    with fundus_sdk.Index.create(root) as ix:
        ix.add([p for p, _ in sample], metadata=[
            {"grade": g, "eye": p.stem.split("_")[1], "patient": int(p.stem.split("_")[0])} for p, g in sample
        ])  # fmt: skip
    return root


@pytest.fixture(scope="module")
def queries(eyepacs_dir) -> list[Path]:
    return [p for p, _ in eyepacs_sample(1, split="test", per_grade=True)[2:4]]


def test_attention_maps_are_distributions_placed_on_the_photo(model):
    photo = FIXTURES / "retina.jpg"
    (explained,) = model.explain([photo])
    side = model.preprocess.size // 32  # the last feature map: EfficientNets reduce by 32
    assert model.explains and explained.attention.shape == (side, side)
    assert explained.attention.min() >= 0 and abs(explained.attention.sum() - 1) < 1e-4
    np.testing.assert_array_equal(explained.vector, model.embed(photo)[0])  # the same descriptor as embed()
    heat = explained.heatmap()
    left, top, right, bottom = explained.box
    assert heat.shape == (explained.photo.height, explained.photo.width) and 0.95 < heat.max() <= 1.0  # bilinear: peak ~1
    outside = np.ones_like(heat, bool)
    outside[top:bottom, left:right] = False
    assert heat[outside].max() == 0  # nothing outside the field of view's crop box
    grid = explained.inside()
    assert 0.25 * side**2 < grid.sum() < side**2 and not grid[0, 0]  # the corners of the grid are surround
    overlay = np.asarray(explained.overlay(), dtype=float)
    plain = np.asarray(explained.photo, dtype=float)
    assert np.abs(overlay - plain).mean() > 1  # the heatmap shows


@pytest.mark.slow  # rewrites the bundled model without its attention output
def test_a_model_without_the_attention_output_loads_but_cannot_explain(tmp_path, model):
    onnx = require("onnx")
    graph = onnx.load(model.path)  # as exported before the attention output existed:
    for field, keep in ((graph.graph.output, lambda o: o.name == "embedding"),
                        (graph.graph.node, lambda n: not n.output[0].startswith("attention"))):  # fmt: skip
        kept = [item for item in field if keep(item)]
        del field[:]
        field.extend(kept)
    plain = tmp_path / "plain.onnx"
    onnx.save(graph, plain)
    loaded = fundus_sdk.Model.load(plain)  # same weights: same fingerprint, indexes still accept it
    assert not loaded.explains and loaded.fingerprint == model.fingerprint
    with pytest.raises(ModelError, match="no attention output.*export.explain"):
        loaded.explain([FIXTURES / "retina.jpg"])

    # the export tool adds it back without changing the descriptor or the fingerprint
    restored = tmp_path / "restored.onnx"
    done = subprocess.run([sys.executable, "-m", "export.explain", str(plain), "-o", str(restored)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    again = fundus_sdk.Model.load(restored)
    (a,), (b,) = again.explain([FIXTURES / "retina.jpg"]), model.explain([FIXTURES / "retina.jpg"])
    np.testing.assert_array_equal(a.attention, b.attention)
    assert again.fingerprint == model.fingerprint
    refused = subprocess.run([sys.executable, "-m", "export.explain", str(restored)], capture_output=True, text=True)
    assert refused.returncode == Exit.FATAL and "already has an output 'attention'" in refused.stderr


@pytest.mark.slow
def test_html_report_renders_in_chromium_offline(tmp_path, cases, queries):
    report = fundus_sdk.report(queries, cases, k=K)
    out = report.write_html(tmp_path / "report.html")
    assert out.stat().st_mode & 0o077 == 0  # it names patients' photos: its owner's only
    page = render(out)

    assert [u for u in page.requests if not u.startswith(("data:", out.resolve().as_uri()))] == []
    assert len(page.images) == len(queries) * 2 * (1 + K)
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in page.images)
    assert DISCLAIMER in page.text and report.model in page.text and "top 4" in page.text

    photos = [np.asarray(page.crop(i).resize((128, 128)), float) for i in page.images if "heat" not in i["cls"]]
    heats = [np.asarray(page.crop(i).resize((128, 128)), float) for i in page.images if "heat" in i["cls"]]
    diffs = [np.abs(h - p).mean(axis=2) for p, h in zip(photos, heats)]
    assert min(d.mean() for d in diffs) > 1.0  # every heatmap is visible on its photo, in the screenshot
    flat = [d.ravel() for d in diffs]
    assert max(np.corrcoef(flat[0], f)[0, 1] for f in flat[1:]) < 0.95  # and they differ between photos

    for q, section in zip(report.queries, page.text.split("Query ")[1:]):
        for n in q.neighbours:
            assert f"score {n.hit.score:.3f}" in section and f"patient: {n.hit.metadata['patient']}" in section


@pytest.mark.slow
def test_the_browser_check_sees_a_network_request(tmp_path):
    """The harness itself: a page that fetches an image over the network is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    assert "http://127.0.0.1:9/x.png" in render(page).requests


def test_png_panel_of_one_query(tmp_path, cases, queries):
    report = fundus_sdk.report(queries[:1], cases, k=K)
    out = report.write_png(tmp_path / "panel.png")
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width >= 1000 and png.height > 600
        colours = np.asarray(png.convert("RGB"))
    assert colours.std() > 30  # photos on it, not a blank canvas
    assert report.queries[0].grade_shares() and abs(sum(report.queries[0].grade_shares().values()) - 1) < 1e-9


def test_search_cli_writes_report_and_png_and_names_a_refused_query(tmp_path, cases, queries):
    html, png = tmp_path / "r.html", tmp_path / "q.png"
    args = ["search", *map(str, queries), str(FIXTURES / "chelsea.jpg"), "--index", str(cases), "-k", str(K),
            "--html", str(html), "--png", str(png)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "fundus_sdk", *args], capture_output=True, text=True)
    assert done.returncode == Exit.PARTIAL, done.stderr
    assert "chelsea.jpg: not a fundus photograph" in done.stderr
    assert f"wrote {html}" in done.stderr and html.read_text().count('<section class="query">') == len(queries)
    assert "chelsea" not in html.read_text()
    assert sorted(p.name for p in tmp_path.glob("q-*.png")) == [f"q-{i + 1}.png" for i in range(len(queries))]


def test_patient_identifiers_only_when_kept(tmp_path, model, queries):
    require("pydicom", extra="dicom")
    from tests.dicom_files import IDENTIFIERS, make_dicom, photo

    dcm = make_dicom(tmp_path / "case.dcm", photo(queries[0]))
    pages = {}
    for keep in (False, True):
        with fundus_sdk.Index.create(tmp_path / f"cases-{keep}", model=model) as ix:
            ix.add([dcm], metadata=[{"grade": 1}], keep_identifiers=keep)
            html = fundus_sdk.report(queries[1:], ix, k=1).to_html()
            pages[keep] = re.sub(r"data:image/[^\"]+", "", html)  # the text, not the pictures' base64
    assert [v for v in IDENTIFIERS.values() if v in pages[False]] == []
    assert "patient_pseudonym" in pages[False] and IDENTIFIERS["PatientName"] in pages[True]


def test_a_case_whose_photo_was_replaced_is_not_shown_as_that_case(tmp_path, model, queries):
    import shutil

    sample = [p for p, _ in eyepacs_sample(1, split="train", per_grade=True)[:2]]
    copies = [tmp_path / f"case{i}.jpg" for i in range(2)]
    for src, dst in zip(sample, copies):
        shutil.copyfile(src, dst)
    with fundus_sdk.Index.create(tmp_path / "cases", model=model) as ix:
        ix.add(copies, metadata=[{"grade": 0}, {"grade": 1}])
        shutil.copyfile(queries[0], copies[1])  # another patient's photo copied over an indexed file
        report = fundus_sdk.report(queries[1], ix, k=2)
    by_path = {n.hit.path: n for n in report.queries[0].neighbours}
    assert by_path[str(copies[0])].explanation is not None
    replaced = by_path[str(copies[1])]
    assert replaced.explanation is None and replaced.problem == f"the photo at {copies[1]} changed since it was indexed"
    assert f"photo not available: the photo at {copies[1]} changed since it was indexed" in report.to_html()


def test_one_bad_query_in_a_batch_is_named_and_the_others_answered(cases, queries):
    grey = np.full((300, 300, 3), 128, np.uint8)
    with fundus_sdk.Index.open(cases, read_only=True) as ix:
        with pytest.raises(fundus_sdk.NotFundusError):
            ix.search_batch([queries[0], grey], k=3)
        errors = []
        hits = ix.search_batch([queries[0], grey, queries[1]], k=3, on_error=errors.append)
        assert [len(h) for h in hits] == [3, 0, 3] and len(errors) == 1 and "<ndarray>" in str(errors[0])
        assert [h.key for h in hits[2]] == [h.key for h in ix.search(queries[1], k=3)]
        with pytest.warns(UserWarning, match="skipped <ndarray>"):
            explained = fundus_sdk.report([grey, queries[0]], ix, k=2, on_error="skip")
        assert [q.query.name for q in explained.queries] == [str(queries[0])]


def test_the_report_speaks_to_a_clinician(tmp_path, model, queries):
    with fundus_sdk.Index.create(tmp_path / "cases", model=model) as ix:
        ix.add(queries, metadata=[{"grade": 2, "split": "train"}, {"grade": 3, "split": "train"}])
        page = fundus_sdk.report(queries[0], ix, k=2).to_html()
    text = re.sub(r"data:image/[^\"]+", "", page)
    assert "2 - moderate NPDR" in text and "3 - severe NPDR" in text and "4 - proliferative DR" in text  # cards, legend
    assert "split" not in text
    assert "This is the query photo itself: it is already in the index." in text and text.count('class="itself"') == 1
    assert "It is not a lesion map" in text
    assert "/<wbr>" in text
