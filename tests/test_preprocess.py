"""Preprocessing of real photographs: any mode, orientation, size and surround, and bad files."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundus_sdk.errors import ImageError
from fundus_sdk.inputs import decode
from fundus_sdk.preprocess import (
    Preprocess,
    _box_sum,
    _brightness,
    _erode,
    equalise_channels,
    fov_box,
    fov_mask,
    local_contrast_normalise,
)
from tests.shared import RETINA

PP = Preprocess()


def close(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two preprocessed images, in grey levels."""
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


def structure(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two preprocessed images at 1/4 resolution (insensitive to sub-pixel shifts)."""
    def blocks(x: np.ndarray) -> np.ndarray:
        x = x.astype(float) - 128
        return x.reshape(64, 4, 64, 4, 3).mean(axis=(1, 3)).ravel()

    u, v = blocks(a), blocks(b)
    return float(u @ v / np.sqrt((u @ u) * (v @ v)))


@pytest.fixture(scope="module")
def retina() -> Image.Image:
    return Image.open(RETINA).convert("RGB")


def test_output_shape_type_and_grey_surround(retina):
    out = PP(retina)
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 128).all() and (out[-1, -1] == 128).all()  # outside the field of view
    assert out[100:150, 100:150].std() > 5  # vessels and texture survive inside it


def test_path_pil_and_array_inputs_agree(retina):
    from_path = PP(RETINA)  # drafted JPEG decode at half size
    assert structure(from_path, PP(retina)) > 0.95
    assert close(PP(np.asarray(retina)), PP(retina)) == 0.0


def test_black_border_is_cropped_away(retina):
    w, h = retina.size
    padded = Image.new("RGB", (w + 600, h + 200))
    padded.paste(retina, (400, 50))
    left, top, right, bottom = fov_box(padded)
    assert abs(left - 400) < 15 and abs(top - 50) < 15
    assert abs(right - (400 + w)) < 15 and abs(bottom - (50 + h)) < 15
    assert structure(PP(padded), PP(retina)) > 0.9


def test_camera_colour_cast_is_normalised_away(retina):
    cast = np.asarray(retina).astype(float) * [1.0, 0.7, 0.5]
    a = PP(retina).astype(float) - 128
    b = PP(cast.astype(np.uint8)).astype(float) - 128
    corr = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    assert corr > 0.9


def test_equalisation_makes_exposure_and_cast_changes_vanish(retina):
    """A darker, flatter, orange exposure of the same eye: equalisation maps it (nearly) back."""
    a = np.asarray(retina).astype(float) / 255
    other = (255 * (0.75 * a) ** 1.3 * [1.0, 0.8, 0.6]).astype(np.uint8)
    v1 = Preprocess(recipe=1)
    apart_v1 = close(v1(retina), v1(other))
    apart_v2 = close(PP(retina), PP(other))
    assert apart_v2 < 0.6 * apart_v1
    assert structure(PP(retina), PP(other)) > 0.97


def test_detail_size_resamples_only_larger_fields_of_view(retina):
    capped = Preprocess(detail_size=200)
    small = retina.resize((180, 180))  # field of view below the cap: untouched
    assert (capped(small) == PP(small)).all()
    big = capped(retina)  # 1411 px: as if the photo had been 200 px
    assert (big == PP(retina.crop(fov_box(retina)).resize((200, 200), Image.BICUBIC))).all()
    assert close(big, PP(retina)) > 1.0  # and that differs from using every pixel


def test_equalise_channels_is_rank_based_and_masked():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:56, 8:56] = True
    out = equalise_channels(img, mask)
    assert (out[~mask] == 0).all()
    for c in range(3):  # inside the mask the levels spread evenly over 0..255
        assert np.percentile(out[:, :, c][mask], [25, 50, 75]) == pytest.approx([64, 128, 191], abs=6)
    lut = np.sort(rng.choice(np.arange(256), 200, replace=False)).astype(np.uint8)  # strictly increasing
    assert (equalise_channels(lut[img], mask) == out).all()


def test_fov_mask_is_the_disc_without_its_rim(retina):
    square = np.asarray(retina.resize((256, 256)))
    mask = fov_mask(square)
    assert not mask[0, 0] and not mask[-1, -1] and mask[128, 128]
    assert 0.6 < mask.mean() < 0.8  # a disc filling its box covers pi/4 = 0.785, less the rim


def test_fov_mask_keeps_dark_structures_inside_the_disc(retina):
    """A dark fovea or haemorrhage is field of view, not surround, whatever the exposure (recipe v3)."""
    square = np.array(retina.resize((256, 256)))
    square[100:130, 140:170] = 3  # a dark blob inside the disc
    square[120:128, 20:26] = 3  # and a dark notch at its edge
    filled, holed = fov_mask(square), fov_mask(square, fill=False)
    assert not holed[115, 155] and filled[115, 155]
    assert not holed[124, 23] and filled[124, 23]
    assert not filled[0, 0] and not filled[-1, -1]
    assert (filled >= holed).all() and filled.mean() - holed.mean() < 0.03
    disc = np.asarray(retina.resize((256, 256))).max(axis=2) > 20  # lift the blacks inside the disc only
    lifted = np.where(disc[..., None], 90 + 0.45 * square, 0).astype(np.uint8)
    assert (fov_mask(lifted) != filled).mean() < 0.005
    assert (fov_mask(lifted, fill=False) != holed).mean() > 0.01  # the v2 mask moved with the exposure


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_every_mode_becomes_rgb(tmp_path: Path, retina, mode):
    small = retina.resize((300, 300))
    if mode == "I;16":
        arr = (np.asarray(small.convert("L")).astype(np.uint16) * 257)
        img = Image.fromarray(arr)
        path = tmp_path / "deep.png"
    else:
        img = small.convert(mode)
        path = tmp_path / ("img.jpg" if mode in ("L", "CMYK") else "img.png")
    img.save(path)
    decoded = decode(path)
    pil, digest = decoded.image, decoded.sha256
    assert pil.mode == "RGB" and pil.size == (300, 300)
    assert len(digest) == 64
    out = PP(path)
    assert out.shape == (256, 256, 3)
    if mode in ("I;16", "L", "LA"):  # grey images keep their structure, scaled to 8 bits
        assert out[60:200, 60:200].std() > 3


def test_transparency_becomes_black(tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    rgba.save(tmp_path / "clear.png")
    pil = decode(tmp_path / "clear.png").image
    assert np.asarray(pil).max() == 0


def test_exif_orientation_is_applied(tmp_path, retina):
    small = retina.resize((400, 300))
    upright = small.transpose(Image.ROTATE_90)  # what a viewer shows for orientation 6/8
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 CW to view: stored image must be rotated 90 CCW by PIL
    small.save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    upright.save(tmp_path / "upright.jpg", quality=95)
    tagged = decode(tmp_path / "tagged.jpg").image
    assert tagged.size == upright.size == (300, 400)
    assert structure(PP(tmp_path / "tagged.jpg"), PP(tmp_path / "upright.jpg")) > 0.95
    assert structure(PP(tmp_path / "tagged.jpg"), PP(small)) < 0.5  # the tag really changed it


def test_large_jpeg_is_draft_decoded_like_a_full_decode(tmp_path, retina):
    big = retina.resize((3200, 3200), Image.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=95)
    drafted = decode(tmp_path / "big.jpg", draft_size=512).image
    assert drafted.size[0] < 3200  # decoded at reduced size
    assert structure(PP(tmp_path / "big.jpg"), PP.from_pil(big)) > 0.95


def png_with_size(path: Path, width: int, height: int) -> None:
    """A tiny valid PNG whose header claims width x height (a decompression bomb)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("empty.png", lambda p: p.write_bytes(b""), "empty"),
        ("text.jpg", lambda p: p.write_text("not an image"), "not an image"),
        ("bomb.png", lambda p: png_with_size(p, 40000, 40000), "decompression bomb"),
        ("big-bomb.png", lambda p: png_with_size(p, 10000, 10000), "decompression bomb"),
        ("tiny.png", lambda p: Image.new("RGB", (8, 8)).save(p), "too small"),
        ("truncated.jpg", lambda p: p.write_bytes(RETINA.read_bytes()[:5000]), "truncated"),
    ],
)
def test_bad_files_raise_one_error_naming_file_and_reason(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageError) as info:
        PP(path)
    assert name in str(info.value) and reason in str(info.value)
    assert info.value.source == str(path)


def test_missing_file_and_wrong_types_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        PP(tmp_path / "absent.jpg")
    with pytest.raises(ImageError, match="uint8"):
        PP(np.zeros((100, 100, 3), dtype=np.float32))
    with pytest.raises(ImageError, match="expected a file path"):
        PP(12345)


def test_lcn_output_is_scale_free():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 20, (128, 128, 3)), 0, 255).astype(np.uint8)
    dim = (img.astype(float) * 0.5).astype(np.uint8)
    a = local_contrast_normalise(img, 8, 32).astype(float)
    b = local_contrast_normalise(dim, 8, 32).astype(float)
    assert np.abs(a - b).mean() < 2.5


@pytest.mark.parametrize("shape, radius", [((96, 80, 4), 12), ((64, 64), 3), ((5, 7, 4), 12), ((1, 1), 1)])
def test_box_sums_equal_numpy_cumsum_to_the_bit(shape, radius):
    # The row-at-a-time running sum must give exactly what the cumsum formula gives, on both axes
    # and for windows wider than the array: embeddings of every existing index depend on it.
    a = (np.random.default_rng(1).random(shape) * 255).astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(a, pad), axis=axis)
        n = a.shape[axis]
        want = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis) - np.take(c, np.arange(n), axis=axis)
        assert np.array_equal(_box_sum(a, radius, axis), want)
        assert np.array_equal(_box_sum(a, radius, axis, passes=2), _box_sum(_box_sum(a, radius, axis), radius, axis))


@pytest.mark.parametrize("shape, radius", [((40, 33), 2), ((9, 9), 1), ((3, 8), 3)])
def test_erosion_keeps_pixels_whose_whole_window_is_set(shape, radius):
    # Outside the array counts as unset, so a pixel within `radius` of the border never survives.
    mask = np.random.default_rng(2).random(shape) > 0.15
    padded = np.pad(mask, radius)
    side = 2 * radius + 1
    want = np.array([[padded[i : i + side, j : j + side].all() for j in range(shape[1])] for i in range(shape[0])])
    assert want.any() == (min(shape) > 2 * radius)  # some pixel survives wherever one can
    assert np.array_equal(_erode(mask, radius), want)


def test_brightness_threshold_is_that_of_np_percentile(retina):
    for rgb in (np.asarray(retina), np.full((40, 40, 3), 7, np.uint8), np.arange(300 * 3, dtype=np.uint8).reshape(30, 10, 3)):
        lum, threshold = _brightness(rgb)
        assert np.array_equal(lum, rgb.max(axis=2).astype(np.float32))
        assert threshold == max(10.0, 0.08 * float(np.percentile(lum, 99)))


def test_metadata_round_trip_and_unknown_recipe():
    pp = Preprocess(size=224, lcn_sigma=0.05, lcn_gain=20.0)
    assert Preprocess.from_metadata(pp.to_metadata()) == pp
    capped = Preprocess(detail_size=256)
    assert Preprocess.from_metadata(capped.to_metadata()) == capped
    v1 = Preprocess(size=224, recipe=1)  # models exported before recipes v2 and v3 keep working
    v1_meta = {k: v for k, v in v1.to_metadata().items() if k != "preprocess.detail_size"}
    assert v1_meta["preprocess.recipe"] == "fov-stretch-lcn-v1"
    assert Preprocess.from_metadata(v1_meta) == v1
    v2 = Preprocess(recipe=2, detail_size=256)
    assert v2.to_metadata()["preprocess.recipe"] == "fov-stretch-equalise-lcn-v2"
    assert Preprocess.from_metadata(v2.to_metadata()) == v2
    with pytest.raises(ValueError, match="recipe"):
        Preprocess(recipe=4)
    with pytest.raises(ValueError, match="recipe"):
        Preprocess.from_metadata({**pp.to_metadata(), "preprocess.recipe": "other"})
