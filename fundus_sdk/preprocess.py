"""Turn any fundus photograph into the square RGB array a model takes.

This is the one definition of fundus preprocessing: the runtime, training and evaluation all
call it, and an exported model records its parameters in its metadata (`Preprocess.to_metadata`)
so the runtime rebuilds exactly the same steps (`Preprocess.from_metadata`).

Steps, in order:
1. decode (fundus_sdk.inputs: JPEGs in draft mode, so a 20-megapixel photo is decoded at
   reduced size; EXIF orientation applied; any mode converted to 8-bit RGB);
2. crop to the bounding box of the circular field of view (the bright disc on a dark surround)
   and stretch it to a square, as the EyePACS training photos were;
3. resize to `size` x `size` (bicubic, antialiased); with `detail_size` set, a larger field of
   view is first resampled to `detail_size` pixels, the resolution of the model's training
   photos: detail finer than the model ever saw is a change of domain, not information (the raw
   CC0 retina photo against an EyePACS-style copy of itself: cosine 0.777 at full detail, 0.852
   through 256 px, with the 256 px-trained default model);
4. find the field of view: pixels brighter than the surround, eroded by ~1% of the side to drop
   the rim, then filled row by row and column by column (recipe v3), so dark structures inside
   the disc (the fovea, vessels, haemorrhages, shaded periphery) stay in it. Recipes v1 and v2
   left them out: they were equalised as surround and flattened to grey by step 6, and the
   mask, hence the whole output, changed with the exposure;
5. histogram-equalise each colour channel inside the field of view (recipe v2 on). The EyePACS
   training photos were published equalised this way (every channel's deciles inside the field
   of view sit near 40/76/136/196/231 whatever the camera); equalising a raw photo puts it in the
   same space and undoes any monotone per-channel change: colour cast, gain, gamma, contrast;
6. local contrast normalisation inside the field of view: subtract the local mean colour
   (a Gaussian of `sigma` x size pixels, computed only from field-of-view pixels) and scale by
   the image's own contrast. This removes slow shading (vignetting, uneven illumination) and
   keeps vessels and lesions. Outside the field of view the output is mid-grey (128).

The model graph then does the rest (cast, scale, normalise, mirror views).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import ImageError
from .gate import Signals, measure
from .inputs import Decoded, ImageInput, decode


@dataclass(frozen=True)
class Recipe:
    """What a preprocessing recipe does, by name (models record the name in their metadata)."""

    name: str
    equalise: bool  # histogram-equalise each channel inside the field of view (step 5)
    fill_fov: bool  # fill the field-of-view mask along rows and columns (step 4)


RECIPES = {
    1: Recipe("fov-stretch-lcn-v1", equalise=False, fill_fov=False),
    2: Recipe("fov-stretch-equalise-lcn-v2", equalise=True, fill_fov=False),
    3: Recipe("fov-filled-equalise-lcn-v3", equalise=True, fill_fov=True),
}
FOV_THUMBNAIL = 1024

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Prepared:
    """A preprocessed photo: the model's input and where it came from in the decoded photo."""

    pixels: np.ndarray  # uint8 (size, size, 3)
    box: Box  # the field of view's crop box (left, top, right, bottom) in the decoded photo
    decoded_size: tuple[int, int]  # (width, height) of the decoded photo (JPEGs: at draft scale)
    signals: Signals  # what the input gate needs to know of the photo (fundus_sdk.gate)
    fov: np.ndarray  # bool (size, size): the field of view in `pixels`


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing parameters; calling it maps one image input to a uint8 (size, size, 3) array."""

    size: int = 256
    lcn_sigma: float = 1 / 30
    lcn_gain: float = 32.0
    recipe: int = 2  # the bundled model's; 1 for models before 0.2; 3 also fills the field of view
    detail_size: int = 0  # >0: larger fields of view are first resampled to this many pixels

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown preprocessing recipe {self.recipe!r}; this runtime knows {sorted(RECIPES)}")

    @property
    def steps(self) -> Recipe:
        """What this preprocessing's recipe does."""
        return RECIPES[self.recipe]

    def __call__(self, image: ImageInput) -> np.ndarray:
        return self.prepare(self.decode(image)).pixels

    @property
    def draft_size(self) -> int:
        """The least size JPEGs are decoded at (draft mode): twice the output, for the resize to average."""
        return 2 * self.size

    def decode(self, image: ImageInput) -> Decoded:
        """Decode an input at the resolution this preprocessing needs (see fundus_sdk.inputs)."""
        return decode(image, draft_size=self.draft_size)

    def load(self, image: ImageInput) -> tuple[Prepared, Decoded]:
        """The preprocessed photo and what decoding found (sha256, DICOM header: fundus_sdk.inputs.Decoded)."""
        decoded = self.decode(image)
        return self.prepare(decoded), decoded

    def prepare(self, decoded: Decoded) -> Prepared:
        """Crop, resize and normalise a decoded input; ImageError if the maths fails on it."""
        try:
            box = fov_box(decoded.image)
            pixels, signals, mask = self._process(decoded.image, box)
            return Prepared(pixels, box, decoded.image.size, signals, mask)
        except Exception as exc:  # a PIL/numpy failure deep in a malformed image
            raise ImageError(decoded.name, f"cannot process image ({exc})") from exc

    def from_pil(self, pil: Image.Image) -> np.ndarray:
        """Crop, resize and normalise an already decoded RGB image."""
        return self._process(pil, fov_box(pil))[0]

    def _process(self, pil: Image.Image, box: Box) -> tuple[np.ndarray, Signals, np.ndarray]:
        fov = pil if box == (0, 0, *pil.size) else pil.crop(box)
        if self.detail_size and max(fov.size) > self.detail_size:
            fov = fov.resize((self.detail_size, self.detail_size), Image.BICUBIC)
        square = np.asarray(fov.resize((self.size, self.size), Image.BICUBIC), dtype=np.uint8)
        mask = fov_mask(square, fill=self.steps.fill_fov)
        signals = measure(square, mask, box)
        if self.steps.equalise:
            square = equalise_channels(square, mask)
        return local_contrast_normalise(square, self.lcn_sigma * self.size, self.lcn_gain, mask), signals, mask

    def to_metadata(self) -> dict[str, str]:
        """The parameters as model metadata entries (`preprocess.*`)."""
        return {
            "preprocess.recipe": self.steps.name,
            "preprocess.size": str(self.size),
            "preprocess.lcn_sigma": repr(self.lcn_sigma),
            "preprocess.lcn_gain": repr(self.lcn_gain),
            "preprocess.detail_size": str(self.detail_size),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> "Preprocess":
        """The preprocessing a model's metadata records; ValueError for an unknown recipe."""
        name = meta.get("preprocess.recipe")
        recipe = next((number for number, known in RECIPES.items() if known.name == name), None)
        if recipe is None:
            known = sorted(r.name for r in RECIPES.values())
            raise ValueError(f"unknown preprocessing recipe {name!r}; this runtime knows {known}")
        return cls(
            size=int(meta["preprocess.size"]),
            lcn_sigma=float(meta["preprocess.lcn_sigma"]),
            lcn_gain=float(meta["preprocess.lcn_gain"]),
            recipe=recipe,
            detail_size=int(meta.get("preprocess.detail_size", 0)),
        )


def fov_box(pil: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom) of the bright field of view in `pil`.

    Found on a thumbnail of at most FOV_THUMBNAIL pixels: a pixel belongs to the field of view
    when its brightest channel exceeds a threshold relative to the image's 99th percentile. The
    thumbnail must be fine: at 256 px one thumbnail row of a 1411 px photo is 5.5 pixels, and
    JPEG noise moving the edge by one row changed the embedding (cosine 0.95 to the PNG). If
    nothing sensible is found (not a fundus photo, or no dark surround) the whole image is the box.
    """
    w, h = pil.size
    scale = min(1.0, FOV_THUMBNAIL / max(w, h))
    thumb = np.asarray(pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
    lum, threshold = _brightness(thumb)
    mask = lum > threshold
    rows = np.flatnonzero(mask.mean(axis=1) > 0.02)
    cols = np.flatnonzero(mask.mean(axis=0) > 0.02)
    if rows.size == 0 or cols.size == 0:
        return 0, 0, w, h
    top, bottom = rows[0] / scale, (rows[-1] + 1) / scale
    left, right = cols[0] / scale, (cols[-1] + 1) / scale
    if (bottom - top) * (right - left) < 0.1 * w * h:
        return 0, 0, w, h
    return (max(0, int(left)), max(0, int(top)), min(w, int(round(right))), min(h, int(round(bottom))))


def _brightness(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Each pixel's brightest channel (float32) and the field-of-view threshold on it.

    The threshold is 8% of the 99th percentile (at least 10). The percentile is read off the
    histogram when the ranks around it hold one grey level, as they nearly always do, which
    gives np.percentile's value at a tenth of its cost.
    """
    brightest = np.maximum(np.maximum(rgb[:, :, 0], rgb[:, :, 1]), rgb[:, :, 2])
    lum = brightest.astype(np.float32)
    at_or_below = np.cumsum(np.bincount(brightest.ravel(), minlength=256))
    rank = int(0.99 * (lum.size - 1))
    around = np.searchsorted(at_or_below, np.clip(np.arange(rank - 1, rank + 3), 0, lum.size - 1), side="right")
    p99 = float(around[0]) if (around == around[0]).all() else float(np.percentile(lum, 99))
    return lum, max(10.0, 0.08 * p99)


def _box_sum(a: np.ndarray, radius: int, axis: int, passes: int = 1) -> np.ndarray:
    """Moving sum over a window of 2*radius+1 along `axis` (0 or 1), zero outside the array.

    With `passes` > 1 the sum is taken again on its own result. Each running sum adds one row
    after another in float32, as `np.cumsum` does, so results are the same to the bit; numpy's
    own cumsum along the first axis of an image is 6x slower.
    """
    dtype = np.result_type(a, np.float32)
    src = _swap_axes(a.astype(dtype, copy=False)) if axis else np.array(a, dtype=dtype, order="C")
    dst = np.empty_like(src)
    n = src.shape[0]
    src_rows, dst_rows = list(src), list(dst)  # views made once: indexing in the loop cost 2/3 of it
    for _ in range(passes):
        for previous, row in zip(src_rows, src_rows[1:]):
            np.add(row, previous, out=row)
        dst[: max(0, n - radius)] = src[radius:]
        dst[max(0, n - radius) :] = src[-1]
        if n > radius + 1:
            dst[radius + 1 :] -= src[: n - radius - 1]
        src, dst, src_rows, dst_rows = dst, src, dst_rows, src_rows
    return _swap_axes(src) if axis else src


def _swap_axes(a: np.ndarray) -> np.ndarray:
    """A C-ordered copy of `a` with its first two axes swapped.

    A pixel's channels move as one item: transposing an (h, w, 4) float32 image item by item
    took twice as long.
    """
    if a.ndim == 3 and a.flags.c_contiguous:
        h, w, c = a.shape
        pixels = a.view(np.dtype((np.void, c * a.itemsize))).reshape(h, w)
        return pixels.T.copy().view(a.dtype).reshape(w, h, c)
    return np.swapaxes(a, 0, 1).copy()


def _gaussian_sum(a: np.ndarray, sigma: float) -> np.ndarray:
    """Unnormalised Gaussian-like blur over the first two axes (three box passes per axis)."""
    radius = max(1, int(round((np.sqrt(4 * sigma * sigma + 1) - 1) / 2)))
    return _box_sum(_box_sum(a, radius, 0, passes=3), radius, 1, passes=3)


def fov_mask(rgb: np.ndarray, fill: bool = True) -> np.ndarray:
    """Boolean mask of the field of view in a square uint8 image, eroded by ~1% of its side.

    With `fill`, every row and column is filled from its first to its last field-of-view pixel:
    the field of view is convex, so this keeps dark structures inside it (and dark notches at
    its edge) while the erosion has already removed specks and text in the surround.
    """
    lum, threshold = _brightness(rgb)
    inside = _erode(lum > threshold, max(1, rgb.shape[0] // 100))
    return _fill_spans(inside) | _fill_spans(inside.T).T if fill else inside


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` where every pixel within `radius` (a square window) is set; outside the array counts as unset."""
    h, w = mask.shape
    padded = np.zeros((h + 2 * radius, w + 2 * radius), bool)
    padded[radius : radius + h, radius : radius + w] = mask
    rows = padded[:h].copy()
    for k in range(1, 2 * radius + 1):
        rows &= padded[k : k + h]
    out = rows[:, :w].copy()
    for k in range(1, 2 * radius + 1):
        out &= rows[:, k : k + w]
    return out


def _fill_spans(mask: np.ndarray) -> np.ndarray:
    """Each row of `mask` set from its first to its last True pixel (rows with none stay empty)."""
    cols = np.arange(mask.shape[1])
    first = mask.argmax(axis=1)
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    return (cols >= first[:, None]) & (cols <= last[:, None]) & mask.any(axis=1)[:, None]


def equalise_channels(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Histogram-equalise each channel over the pixels in `mask`; pixels outside become 0.

    Each grey level maps to 255 x the fraction of masked pixels below it (ties counted half),
    so the result is the same for any strictly increasing per-channel transform of the input.
    """
    image = Image.fromarray(rgb)
    inside = Image.fromarray(mask)
    hist = np.array(image.histogram(inside), np.float64).reshape(3, 256)
    n = max(1, int(np.count_nonzero(mask)))
    luts = np.rint((np.cumsum(hist, axis=1) - hist / 2) * (255.0 / n)).astype(np.uint8)
    return np.asarray(Image.composite(image.point(luts.ravel().tolist()), Image.new("RGB", image.size), inside))


def local_contrast_normalise(
    rgb: np.ndarray, sigma: float, gain: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Subtract the field-of-view-only local mean colour and rescale by the image's contrast.

    `mask` is the field of view (found with `fov_mask` when not given).
    """
    mask = fov_mask(rgb) if mask is None else mask
    m = mask.astype(np.float32)
    weighted = np.empty((*m.shape, 4), np.float32)
    weighted[:, :, 3] = m
    # One colour plane at a time: numpy broadcasting the mask over a last axis of 3 was 4x slower.
    for c in range(3):
        np.multiply(rgb[:, :, c], m, out=weighted[:, :, c])
    blurred = _gaussian_sum(weighted, sigma)
    covered = np.maximum(blurred[:, :, 3], 1e-6)
    detail = np.empty((*m.shape, 3), np.float32)
    for c in range(3):
        plane = detail[:, :, c]
        np.divide(blurred[:, :, c], covered, out=plane)  # the local mean
        np.subtract(rgb[:, :, c], plane, out=plane)
        np.multiply(plane, m, out=plane)
    n = max(1.0, float(m.sum()) * 3)
    scale = float(np.sqrt((detail**2).sum() / n))
    out = np.multiply(detail, np.float32(gain / max(scale, 1.0)), out=detail)
    out += np.float32(128.0)
    return np.clip(np.rint(out, out=out), 0, 255, out=out).astype(np.uint8)

