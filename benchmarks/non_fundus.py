"""Pictures that are not colour fundus photographs, for the input gate's tests and benchmark.

scikit-image's bundled sample images (CC0 or public domain, read from the installed package)
plus pictures rendered here: documents, screenshots, noise, flat frames, X-ray-like and
skin-like pictures, OCT-like B-scans and a fundus photo rotated into the corner of a larger
canvas. Every picture is made from a fixed seed, so a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from benchmarks.common import RETINA

SKIMAGE_SAMPLES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "chessboard_GRAY", "chessboard_RGB", "clock_motion",
    "coffee", "coins", "color", "grass", "gravel", "horse", "hubble_deep_field", "ihc", "logo", "moon",
    "motorcycle_left", "page", "phantom", "rocket", "text",
)  # fmt: skip


def skimage_samples() -> dict[str, Image.Image]:
    """scikit-image's sample pictures that ship inside its package (no download)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    out = {}
    for name in SKIMAGE_SAMPLES:
        path = next(folder.glob(f"{name}.*"))
        out[f"skimage {name}"] = Image.open(path).convert("RGB")
    return out


def _document(rng: np.random.Generator, dark: bool = False) -> Image.Image:
    img = Image.new("RGB", (850, 1100), (30, 30, 34) if dark else (250, 250, 246))
    draw = ImageDraw.Draw(img)
    ink = (220, 220, 220) if dark else (20, 20, 20)
    y = 80
    while y < 1020:
        x = 70
        while x < 760:
            word = int(rng.integers(20, 90))
            draw.rectangle((x, y, min(x + word, 780), y + 12), fill=ink)
            x += word + 12
        y += int(rng.choice([24, 24, 24, 48]))
    return img


def _screenshot(rng: np.random.Generator, theme: int) -> Image.Image:
    back = [(236, 236, 236), (40, 44, 52), (255, 255, 255)][theme]
    img = Image.new("RGB", (1280, 800), back)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, 1280, 36), fill=(60, 90, 160))
    draw.rectangle((0, 36, 220, 800), fill=tuple(int(c * 0.9) for c in back))
    for _ in range(14):
        x, y = int(rng.integers(240, 1100)), int(rng.integers(60, 700))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle((x, y, x + int(rng.integers(60, 300)), y + int(rng.integers(20, 120))), fill=colour)
    for y in range(60, 780, 22):
        draw.rectangle((20, y, int(rng.integers(80, 200)), y + 10), fill=(120, 120, 120))
    return img


def _noise(rng: np.random.Generator, kind: str) -> Image.Image:
    if kind == "uniform":
        a = rng.integers(0, 256, (512, 512, 3))
    elif kind == "gaussian":
        a = np.clip(128 + 40 * rng.standard_normal((512, 512, 3)), 0, 255)
    elif kind == "grey":
        a = np.repeat(rng.integers(0, 256, (512, 512, 1)), 3, axis=2)
    else:  # red-tinted noise inside a disc: colour and shape without any anatomy
        a = rng.integers(0, 256, (512, 512, 3)) * np.array([1.0, 0.45, 0.2])
        yy, xx = np.mgrid[-1:1:512j, -1:1:512j]
        a = a * ((xx**2 + yy**2) <= 0.95)[..., None]
    return Image.fromarray(a.astype(np.uint8))


def _flat(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (640, 480), colour)


def _xray_like(rng: np.random.Generator, variant: int) -> Image.Image:
    """A greyscale radiograph stand-in: bright bony arcs on a dark, smooth body."""
    h, w = 1024, 860
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    body = np.exp(-(((xx - w / 2) / (w * 0.38)) ** 4 + ((yy - h / 2) / (h * 0.48)) ** 4)) * 90
    for k in range(9):
        centre = h * (0.2 + 0.07 * k)
        for side in (-1, 1):
            arc = np.abs(np.hypot((xx - w / 2) * 0.9, yy - centre + 140) - 160 - side * (xx - w / 2) * 0.1)
            body += 70 * np.exp(-((arc / 9.0) ** 2)) * (np.abs(xx - w / 2) > 40)
    body += 120 * np.exp(-(((xx - w / 2) / 22) ** 2)) * (yy > h * 0.1)  # the spine
    body += rng.normal(0, 6, body.shape)
    grey = Image.fromarray(np.clip(body, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1 + variant))
    return grey.convert("RGB")


def _skin_like(rng: np.random.Generator, tone: int) -> Image.Image:
    """A close-up of skin: a smooth pink-orange field with pores, hairs and shading."""
    base = np.array([[224, 172, 150], [198, 134, 100], [141, 85, 60]][tone], np.float32)
    h, w = 600, 800
    low = Image.fromarray((rng.random((h // 40, w // 40)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    shade = 0.85 + 0.3 * np.asarray(low, np.float32)[..., None] / 255
    a = base * shade + rng.normal(0, 4, (h, w, 1))
    for _ in range(400):  # pores
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        a[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] *= 0.8
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(30):  # hairs
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.line((x, y, x + int(rng.integers(-60, 60)), y + int(rng.integers(-60, 60))), fill=(60, 40, 30), width=2)
    return img


def _oct_like(rng: np.random.Generator, variant: int) -> Image.Image:
    """An OCT B-scan stand-in: speckled bright retinal layers curving across a dark field."""
    h, w = 496, 768
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    surface = h * 0.35 + 30 * np.sin(xx / w * np.pi * (1 + variant)) + 40 * np.exp(-(((xx - w / 2) / 60) ** 2))
    a = np.zeros((h, w), np.float32)
    for depth, strength in ((0, 200), (25, 90), (60, 140), (110, 230)):
        a += strength * np.exp(-(((yy - surface - depth) / 6.0) ** 2))
    a *= rng.gamma(2.0, 0.5, a.shape)  # speckle
    a += 12 * rng.random(a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")


def _fundus_in_corner(angle: float, canvas: int) -> Image.Image:
    """The CC0 fundus photo shrunk, rotated and pasted into one corner of a large white canvas."""
    photo = Image.open(RETINA).convert("RGB").resize((canvas // 4, canvas // 4), Image.BICUBIC)
    photo = photo.rotate(angle, expand=True, fillcolor=(0, 0, 0))
    img = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    img.paste(photo, (10, 10))
    return img


def rendered() -> dict[str, Image.Image]:
    """The rendered part of the set, each from a fixed seed."""
    makers: dict[str, Callable[[np.random.Generator], Image.Image]] = {
        "document": _document,
        "document, dark mode": lambda r: _document(r, dark=True),
        **{f"screenshot {t}": (lambda r, t=t: _screenshot(r, t)) for t in range(3)},
        **{f"noise {k}": (lambda r, k=k: _noise(r, k)) for k in ("uniform", "gaussian", "grey", "red disc")},
        "flat black": lambda r: _flat((0, 0, 0)),
        "flat white": lambda r: _flat((255, 255, 255)),
        "flat grey": lambda r: _flat((128, 128, 128)),
        "flat orange": lambda r: _flat((200, 90, 30)),
        **{f"x-ray-like {v}": (lambda r, v=v: _xray_like(r, v)) for v in range(3)},
        **{f"skin-like {t}": (lambda r, t=t: _skin_like(r, t)) for t in range(3)},
        **{f"OCT-like B-scan {v}": (lambda r, v=v: _oct_like(r, v)) for v in range(3)},
        "fundus rotated into a corner (30 deg)": lambda r: _fundus_in_corner(30, 2000),
        "fundus rotated into a corner (135 deg)": lambda r: _fundus_in_corner(135, 1600),
    }
    return {name: make(np.random.default_rng(seed)) for seed, (name, make) in enumerate(makers.items())}


def non_fundus_set() -> dict[str, Image.Image]:
    """Every picture of the set by name: scikit-image's samples and the rendered ones."""
    return {**skimage_samples(), **rendered()}
