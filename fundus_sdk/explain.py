"""Where a descriptor's evidence came from: the mirror-attention map, on the photo itself.

A model with the optional `attention` output (fundus_sdk.contract) gives, for each position of
its last feature map, the share of the mirror attention that position receives. `Explanation`
holds that map with the field-of-view crop the preprocessing used, so the map is drawn back
onto the photo as decoded: stretched over the crop box (the preprocessing stretched that box to
the model's square input), nothing outside it.

The heatmap shows the attention among the positions inside the field of view only. The bundled
model sends almost all of its attention to the grey surround (on EyePACS photos a corner cell
receives a median 178 times a central cell's share, and the cells inside the field of view 4% in
all): a sink that carries no evidence about the retina and, left in, would leave the disc itself
dark in every picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .gate import Verdict

Box = tuple[int, int, int, int]

# A dark-to-bright colour scale (black, purple, red, orange, pale yellow), readable in grey print
# and for the common colour-vision deficiencies, as the perceptual scales of plotting libraries.
SCALE = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colour_scale(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on SCALE (piecewise linear)."""
    x = np.clip(values, 0.0, 1.0) * (len(SCALE) - 1)
    low = np.minimum(x.astype(int), len(SCALE) - 2)
    t = (x - low)[..., None]
    return np.rint(SCALE[low] * (1 - t) + SCALE[low + 1] * t).astype(np.uint8)


def wholly_inside(fov: np.ndarray, side: int) -> np.ndarray:
    """bool (side, side): the cells of a side x side grid over `fov` (bool, size x size) every pixel
    of which lies in the field of view (how the attention's share on the retina is measured)."""
    cell = fov.shape[0] // side
    return fov[: cell * side, : cell * side].reshape(side, cell, side, cell).all(axis=(1, 3))


@dataclass(frozen=True)
class Explanation:
    """One photo's descriptor, gate verdict and attention map (`Model.explain`)."""

    name: str  # the input, for messages and reports
    vector: np.ndarray = field(repr=False)  # float32 (dim,), unit norm
    attention: np.ndarray = field(repr=False)  # float32 (side, side) on the model's input grid, sums to 1
    fov: np.ndarray = field(repr=False)  # bool (size, size): the field of view in the model's input
    box: Box  # the field of view's crop box in `photo`
    photo: Image.Image = field(repr=False)  # RGB, as decoded (JPEGs at draft scale)
    verdict: Verdict | None = None
    sha256: str = ""  # the identity of the input explained (fundus_sdk.inputs)

    def inside(self) -> np.ndarray:
        """bool (side, side): the cells of the attention grid (almost) wholly inside the field of view."""
        side = self.attention.shape[0]
        cover = Image.fromarray(self.fov.astype(np.float32), mode="F").resize((side, side), Image.BOX)
        return np.asarray(cover) >= 0.95  # rim cells hold the dark edge: part of the sink

    def heatmap(self) -> np.ndarray:
        """float32 (height, width) of `photo`: the attention over the field of view, 1 at its
        peak, 0 outside the crop box and on grid cells outside the field of view."""
        left, top, right, bottom = self.box
        kept = np.where(self.inside(), self.attention, 0.0)
        peak = float(kept.max())
        scaled = (kept / peak if peak > 0 else kept).astype(np.float32)
        inside = Image.fromarray(scaled, mode="F").resize((right - left, bottom - top), Image.BILINEAR)
        out = np.zeros((self.photo.height, self.photo.width), np.float32)
        out[top:bottom, left:right] = np.asarray(inside)
        return out

    def overlay(self, strength: float = 0.75) -> Image.Image:
        """The photo with the heatmap blended over it: strongest where the attention is."""
        heat = self.heatmap()
        alpha = (strength * heat)[..., None]
        photo = np.asarray(self.photo.convert("RGB"), dtype=np.float32)
        return Image.fromarray(np.rint(photo * (1 - alpha) + colour_scale(heat) * alpha).astype(np.uint8))
