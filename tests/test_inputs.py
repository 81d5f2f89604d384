"""The one door for inputs: every kind of input decodes to the same pixels and identity."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from fundus_sdk import ImageError, Preprocess, decode, embed
from fundus_sdk.inputs import find_images, pixel_hash
from tests.shared import FIXTURES, RETINA


def test_a_path_its_bytes_and_a_file_object_decode_alike():
    data = RETINA.read_bytes()
    with open(RETINA, "rb") as f:
        kinds = [decode(RETINA), decode(data), decode(io.BytesIO(data)), decode(f)]
    assert {d.sha256 for d in kinds} == {hashlib.sha256(data).hexdigest()}
    assert {d.format for d in kinds} == {"JPEG"}
    first = np.asarray(kinds[0].image)
    assert all(np.array_equal(np.asarray(d.image), first) for d in kinds[1:])
    assert kinds[3].name == str(RETINA)  # a file object is named by its file


def test_format_is_recognised_by_content_not_by_name(tmp_path):
    png_named_jpg = tmp_path / "really-a-png.jpg"
    Image.open(FIXTURES / "microaneurysms.png").save(png_named_jpg, format="PNG")
    assert decode(png_named_jpg).format == "PNG"


def test_postscript_is_never_handed_to_ghostscript(tmp_path):
    fake = tmp_path / "scan.jpg"
    fake.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n")
    with pytest.raises(ImageError, match="scan.jpg: not an image file"):
        decode(fake)


def test_in_memory_images_are_identified_by_their_pixels():
    rgb = np.asarray(Image.open(RETINA).convert("RGB").resize((64, 64)))
    assert decode(rgb).sha256 == pixel_hash(rgb) == decode(rgb.copy()).sha256
    assert decode(rgb).sha256 != decode(rgb[::-1].copy()).sha256
    assert decode(Image.fromarray(rgb)).sha256 == pixel_hash(rgb)


def test_text_mode_file_objects_and_other_types_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with open(text) as f, pytest.raises(ImageError, match="binary mode"):
        decode(f)
    with pytest.raises(ImageError, match="expected a file path, bytes"):
        decode(42)
    with pytest.raises(ImageError, match="empty input"):
        decode(b"")


def test_preprocessing_reports_the_field_of_view_box_in_the_decoded_photo():
    disc = Image.open(RETINA).convert("RGB").resize((300, 300))
    canvas = Image.new("RGB", (640, 400))
    canvas.paste(disc, (250, 60))  # a camera frame: the disc off-centre on a black surround
    prepared = Preprocess().prepare(decode(canvas))
    assert prepared.decoded_size == (640, 400)
    assert np.abs(np.array(prepared.box) - (250, 60, 550, 360)).max() <= 6
    assert np.array_equal(prepared.pixels, Preprocess()(canvas))


def test_embed_takes_bytes_and_file_objects(tmp_path):
    data = RETINA.read_bytes()
    vectors = embed([RETINA, data, io.BytesIO(data)])
    assert np.allclose(vectors[0], vectors[1]) and np.allclose(vectors[0], vectors[2])


def test_folders_take_every_raster_format_and_name_what_they_skip(tmp_path):
    photo = Image.open(RETINA).convert("RGB").resize((256, 256))
    for name in ("a.webp", "b.tif", "c.jp2", "d.png"):
        photo.save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("grades to follow")
    (tmp_path / "sub").mkdir()
    photo.save(tmp_path / "sub" / "e.jpg")
    skipped = []
    found = find_images([tmp_path], on_skipped=lambda path, reason: skipped.append((path.name, reason)))
    assert [p.name for p in found] == ["a.webp", "b.tif", "c.jp2", "d.png"]
    assert [(n, "-r" in r) for n, r in skipped] == [("notes.txt", False), ("sub", True)]
    assert [p.name for p in find_images([tmp_path], recursive=True)][-1] == "e.jpg"
    assert len({decode(p).sha256 for p in found}) == 4


def test_avif_is_decoded_like_the_other_raster_formats(tmp_path):
    from PIL import features

    if not features.check("avif"):
        pytest.fail("this Pillow cannot write AVIF; the project's Pillow pin brings it")
    path = tmp_path / "photo.avif"
    Image.open(RETINA).save(path, format="AVIF", quality=90)
    decoded = decode(path)
    assert decoded.format == "AVIF" and decoded.image.size == Image.open(RETINA).size
    assert path in find_images([tmp_path])


def test_one_rule_says_which_files_in_a_folder_are_photos(tmp_path):
    from fundus_sdk.inputs import photo_by_name

    assert [photo_by_name(n) for n in ("a.JPG", "b.dcm", "IM000123", "notes.txt", "._a.jpg", ".DS_Store")] == [
        True, True, None, False, False, False]  # fmt: skip
    (tmp_path / "._a.jpg").write_bytes(RETINA.read_bytes())  # an AppleDouble file beside a copied photo
    (tmp_path / "a.jpg").write_bytes(RETINA.read_bytes())
    assert find_images([tmp_path]) == [tmp_path / "a.jpg"]
