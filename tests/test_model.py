"""embed() and load_model() on the bundled model: a real ONNX Runtime session, real photos."""

import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

import fundus_sdk
from fundus_sdk import contract
from fundus_sdk.errors import ImageError, ModelError, ProviderError
from tests.shared import RETINA, eyepacs_sample, require


@pytest.fixture(scope="module")
def model():
    return fundus_sdk.load_model()


@pytest.fixture(scope="module")
def photos():
    return [p for p, _ in eyepacs_sample(5)]


def test_import_does_not_load_training_libraries():
    code = (
        "import sys, fundus_sdk; "
        "bad = [m for m in ('torch', 'timm', 'torchvision', 'onnx') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_metadata_is_complete_and_consistent(model):
    for key in contract.REQUIRED:
        assert model.metadata[key]
    assert len(model.fingerprint) == 64 and int(model.fingerprint, 16) >= 0
    assert model.preprocess.size == int(model.metadata[contract.INPUT_SIZE])
    out = model.embed(RETINA)
    assert out.shape == (1, model.dim)


def test_unit_norm_deterministic_and_in_order(model, photos):
    a = fundus_sdk.embed(photos)
    b = fundus_sdk.embed(photos[::-1])
    assert a.dtype == np.float32 and a.shape == (5, model.dim)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b[::-1], atol=1e-6)
    np.testing.assert_allclose(a, fundus_sdk.embed(photos), atol=0)
    assert np.abs(a @ a.T - np.eye(5)).max() > 1e-3  # different photos, different vectors


def test_batch_size_does_not_change_vectors(model, photos):
    np.testing.assert_allclose(model.embed(photos, batch_size=1), model.embed(photos, batch_size=4), atol=1e-5)


def test_iter_embed_reads_ahead_a_bounded_way_and_keeps_order(model, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    items = [photos[i % len(photos)] for i in range(9)]
    items[4] = bad
    pulled = []

    def source():
        for i, item in enumerate(items):
            pulled.append(i)
            yield item

    batches = model.iter_embed(source(), batch_size=2, check=False)
    first = next(batches)
    # the next batches are being embedded while the first is handed over, but never the whole input
    assert 2 < len(pulled) <= 3 * 2
    done = [first, *batches]
    assert [i for b in done for i in b.positions] == [0, 1, 2, 3, 5, 6, 7, 8]
    assert [str(e.source) for b in done for e in b.errors] == [str(bad)]
    expected = model.embed([item for item in items if item != bad])
    np.testing.assert_allclose(np.concatenate([b.vectors for b in done]), expected, atol=1e-5)


def test_iter_embed_runs_the_model_on_two_batches_at_once(model, photos, monkeypatch):
    both_running = threading.Barrier(2, timeout=30)  # broken unless two calls meet inside ONNX Runtime
    session, sizes = model.session, []

    class MeetingSession:
        def run(self, names, feeds):
            sizes.append(len(feeds[contract.INPUT_NAME]))
            both_running.wait()
            return session.run(names, feeds)

        def __getattr__(self, name):
            return getattr(session, name)

    monkeypatch.setattr(model, "session", MeetingSession())
    batches = list(model.iter_embed(photos[:4], batch_size=2, workers=2, check=False))
    assert [b.positions for b in batches] == [[0, 1], [2, 3]]
    # on the CPU the two calls together hold no more images than one call of RUN_CHUNK (memory)
    assert 2 * max(sizes) <= fundus_sdk.model.RUN_CHUNK and sum(sizes) == 4
    monkeypatch.setattr(model, "session", session)
    np.testing.assert_allclose(np.concatenate([b.vectors for b in batches]), model.embed(photos[:4]), atol=1e-5)


def test_run_calls_the_graph_in_chunks_with_the_same_result(model, photos, monkeypatch):
    x = np.stack([model.preprocess(p) for p in photos])  # 5: not a multiple of the chunk
    whole = model.run(x)
    monkeypatch.setattr(fundus_sdk.model, "RUN_CHUNK", 16)  # one call for the whole batch
    np.testing.assert_allclose(model.run(x), whole, atol=1e-5)
    maps = np.stack([e.attention for e in model.explain(photos)])
    monkeypatch.setattr(fundus_sdk.model, "RUN_CHUNK", 1)
    np.testing.assert_allclose(np.stack([e.attention for e in model.explain(photos)]), maps, atol=1e-6)
    assert model.run(x[:0]).shape == (0, model.dim)


def test_paths_pil_images_and_arrays_mix(model, photos):
    pil = Image.open(photos[1]).convert("RGB")
    mixed = model.embed([photos[0], pil, np.asarray(pil)])
    ref = model.embed(photos[:2])
    np.testing.assert_allclose(mixed[0], ref[0], atol=1e-6)
    assert mixed[1] @ ref[1] > 0.999 and mixed[2] @ ref[1] > 0.999


def test_png_and_jpeg_of_one_photo_embed_alike(model, tmp_path):
    """The same photo, whatever its file format, size or JPEG settings.

    Measured with the bundled model 0.2.0 on this photo, cosine to the PNG: a quality-95 JPEG
    with full (4:4:4) chroma 0.992, half-horizontal (4:2:2) 0.986, quarter (4:2:0) 0.987; resized
    to 700 px 0.977 (0.1.0: 0.992, 0.992, 0.987, 0.970). Unrelated photos sit at 0.56 (95th
    percentile 0.66). High-quality JPEGs must reach 0.98.
    """
    photo = Image.open(RETINA).convert("RGB")
    photo.save(tmp_path / "r.png")
    photo.save(tmp_path / "q95.jpg", quality=95, subsampling=0)
    photo.save(tmp_path / "q95-422.jpg", quality=95, subsampling=1)
    photo.save(tmp_path / "q95-420.jpg", quality=95, subsampling=2)
    photo.resize((700, 700), Image.LANCZOS).save(tmp_path / "small.jpg", quality=95, subsampling=0)
    names = ["r.png", "q95.jpg", "q95-422.jpg", "q95-420.jpg", "small.jpg"]
    v = model.embed([tmp_path / n for n in names])
    png, full, half, quarter, small = v
    assert png @ full >= 0.98 and png @ half >= 0.98 and png @ quarter >= 0.98
    assert png @ small >= 0.96


def test_bad_image_raises_or_is_skipped(model, photos, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    with pytest.raises(ImageError, match="bad.jpg"):
        model.embed([photos[0], bad])
    with pytest.warns(UserWarning, match="bad.jpg"):
        out = model.embed([photos[0], bad, photos[1]], on_error="skip")
    assert np.isnan(out[1]).all() and not np.isnan(out[[0, 2]]).any()
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.embed([bad, photos[0]], on_error=seen.append)
    assert [e.source for e in seen] == [str(bad)]


def test_missing_or_foreign_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        fundus_sdk.load_model(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="junk.onnx"):
        fundus_sdk.load_model(junk)


def test_asking_for_cuda_without_the_gpu_build_is_a_clear_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this environment has the GPU build")
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        fundus_sdk.load_model(providers="cuda")


def _tampered(tmp_path, change) -> str:
    onnx = require("onnx")
    proto = onnx.load(str(fundus_sdk.model.default_model_path()))
    change(proto, onnx)
    out = tmp_path / "tampered.onnx"
    onnx.save_model(proto, str(out))
    return str(out)


def test_weights_changed_under_copied_metadata_are_refused(tmp_path):
    def nudge(proto, onnx):
        t = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        values = onnx.numpy_helper.to_array(t).copy()
        values.flat[0] += 0.5
        t.CopyFrom(onnx.numpy_helper.from_array(values, t.name))

    with pytest.raises(ModelError, match="weights do not match the fingerprint"):
        fundus_sdk.Model.load(_tampered(tmp_path, nudge))


@pytest.mark.parametrize("key, value, words", [("model.dim", "128", "dimension 128"), ("input.size", "999", "input 999 px")])
def test_metadata_that_disagrees_with_the_graph_is_refused(tmp_path, key, value, words):
    def edit(proto, onnx):
        meta = {p.key: p.value for p in proto.metadata_props} | {key: value}
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, meta)

    with pytest.raises(ModelError, match=words):
        fundus_sdk.Model.load(_tampered(tmp_path, edit))


def test_threads_and_onnx_runtimes_provider_options_form(tmp_path):
    default = fundus_sdk.load_model()
    one = fundus_sdk.load_model(threads=1, providers=[("CPUExecutionProvider", {})])
    assert one is not default and one.session.get_session_options().intra_op_num_threads == 1
    assert fundus_sdk.load_model(threads=2, providers=[("cpu", {})]).providers == ["CPUExecutionProvider"]  # alias in a pair
    assert np.allclose(one.embed(RETINA), default.embed(RETINA), atol=1e-5)
    with pytest.raises(ProviderError, match="a name or a"):
        fundus_sdk.load_model(providers=[("CPUExecutionProvider",)])
    with fundus_sdk.Index.create(tmp_path / "ix", threads=1) as ix:
        assert ix.model.session.get_session_options().intra_op_num_threads == 1
    with fundus_sdk.Index.open(tmp_path / "ix", read_only=True, threads=1) as ix:
        assert ix.model.session.get_session_options().intra_op_num_threads == 1
