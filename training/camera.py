"""Raw-camera stand-ins made from the photos on hand, for the gate calibration, tests and benchmarks.

The EyePACS photos were published enhanced (cropped, squashed to 256 px, each channel
equalised); clinic cameras give raw photos. These functions go both ways, so that the same
simulation is measured by benchmarks/raw_photos.py and asserted by the tests.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


def enhanced_like_eyepacs(raw: Image.Image) -> Image.Image:
    """What the EyePACS set's publisher did: crop, squash to 256 px, equalise each channel.

    Inferred from the photos: inside the field of view every channel's deciles sit near
    40/76/136/196/231 whatever the camera, the signature of per-channel histogram equalisation.
    Done here with PIL's own equalize (not the runtime's code).
    """
    arr = np.asarray(raw)
    rows, cols = np.flatnonzero(arr.max(axis=(1, 2)) > 20), np.flatnonzero(arr.max(axis=(0, 2)) > 20)
    crop = raw.crop((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)).resize((256, 256), Image.BICUBIC)
    fov = Image.fromarray((np.asarray(crop).max(axis=2) > 20).astype(np.uint8) * 255)
    return ImageOps.equalize(crop, mask=fov)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def simulated_raw(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """An enhanced 256 px EyePACS photo made to look like a raw camera file."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    a = 0.35 + 0.45 * a  # lower contrast, lifted blacks
    a *= np.array([1.0, rng.uniform(0.45, 0.65), rng.uniform(0.2, 0.4)])  # orange camera cast
    yy, xx = np.mgrid[-1:1:256j, -1:1:256j]
    a *= (1 - 0.35 * (xx**2 + yy**2))[..., None]  # vignetting
    fov = (xx**2 + yy**2) <= 1.0
    a = np.where(fov[..., None], a, 0.0)
    disc = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    canvas = Image.new("RGB", (int(256 * 4 / 3), 256))
    canvas.paste(disc, ((canvas.width - 256) // 2, 0))
    return jpeg(canvas.resize((2048, 1536), Image.BICUBIC), 90)


def versions_of(raw: Image.Image) -> dict[str, Image.Image]:
    """The same photograph as other cameras and pipelines would deliver it, by name."""
    return {
        "enhanced like EyePACS (256 px)": enhanced_like_eyepacs(raw),
        "resized to 512 px": raw.resize((512, 512), Image.LANCZOS),
        "upscaled to 3000 px": raw.resize((3000, 3000), Image.BICUBIC),
        "another camera's cast (G x0.7, B x0.5)": Image.fromarray(
            (np.asarray(raw, dtype=np.float32) * [1.0, 0.7, 0.5]).astype(np.uint8)
        ),
        "JPEG quality 60": jpeg(raw, 60),
        "mirrored (the other eye)": raw.transpose(Image.FLIP_LEFT_RIGHT),
    }
