"""Draft-mode JPEG decoding (the runtime's path) vs a full decode, on 4-18 megapixel photos.

Why: clinic cameras write 10-20 megapixel JPEGs but the model sees 256 px of detail. The runtime
(fundus_sdk.preprocess.Preprocess) opens JPEGs in PIL's draft mode, which lets libjpeg decode
at 1/2, 1/4 or 1/8 scale (never below twice the output size). This measures, with the model's
own preprocessing (bundled model, or --model):
- images/s of the whole decode + preprocess path with draft decoding against the naive path
  (PIL open, full decode), both followed by the same crop, resize and normalisation
  (Preprocess.from_pil), and how much the final uint8 arrays differ (mean, 99th percentile and
  max absolute difference, in grey levels);
- the cost of a raw photo against the same photo pre-shrunk to 512 px on its short side (the
  runtime path on both), and the floor under it: decoding the raw file at libjpeg's smallest
  scale (1/8) and nothing else, which no choice of draft scale can beat;
- how far each path moves the model's embedding from that of the full decode (cosine).

The large photos are made on the fly in a temporary directory from tests/fixtures/retina.jpg
(a raw 1411x1411 fundus photo): the disc is upscaled to the photo's height and centred on a
black frame, as fundus cameras frame it, with mild Gaussian noise (--noise) so the JPEGs carry
sensor-like detail and a realistic file size. Upscaled photos hold no real detail beyond the
1411-pixel original, so the array difference likely understates that of a native 20-megapixel
photo.

    python -m benchmarks.decode_speed
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fundus_sdk import load_model
from fundus_sdk.inputs import decode
from fundus_sdk.tables import format_table

from .common import RETINA, measure, print_header, ratio


def size_arg(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=size_arg, nargs="+", default=[(2000, 2000), (3000, 3000), (4000, 3000), (5184, 3456)],
                   metavar="WxH", help="photo sizes to make (default: 2000x2000 3000x3000 4000x3000 5184x3456)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the made photos (default 95)")
    p.add_argument("--noise", type=float, default=2.0, help="std of the added Gaussian noise, grey levels (default 2)")
    p.add_argument("--model", type=Path, help="ONNX model whose preprocessing is used (default: the bundled one)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per path and photo (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    return p.parse_args()


def make_photo(source: Image.Image, width: int, height: int, noise: float, quality: int, path: Path) -> Path:
    """A width x height JPEG: `source` upscaled to the height, centred on black, plus noise."""
    side = min(width, height)
    disc = source.resize((side, side), Image.BICUBIC)
    frame = Image.new("RGB", (width, height))
    frame.paste(disc, ((width - side) // 2, (height - side) // 2))
    pixels = np.asarray(frame, dtype=np.float32)
    pixels += np.random.default_rng(0).normal(0.0, noise, pixels.shape).astype(np.float32)
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)).save(path, quality=quality)
    return path


def shrunk(path: Path, short_side: int, quality: int) -> Path:
    """A copy of the JPEG at `path` resized to `short_side` px on its short side, as a clinic might export it."""
    with Image.open(path) as photo:
        scale = short_side / min(photo.size)
        small = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
    out = path.with_name(f"{path.stem}-{short_side}.jpg")
    small.save(out, quality=quality)
    return out


def smallest_scale_decode(path: Path) -> None:
    """Decode only, at libjpeg's smallest scale (1/8): the least any draft decode can cost."""
    with Image.open(path) as photo:
        photo.draft("RGB", (photo.width // 8, photo.height // 8))
        photo.load()


def main() -> None:
    args = parse_args()
    print_header("decode_speed: draft-mode JPEG decode + preprocess vs full decode + preprocess", ["numpy", "pillow"])
    model = load_model(args.model, threads=1)
    preprocess = model.preprocess
    draft_size = preprocess.draft_size

    def draft(path: Path) -> np.ndarray:
        return preprocess(path)

    def full(path: Path) -> np.ndarray:
        return preprocess.from_pil(decode(path).image)

    with Image.open(RETINA) as original:
        source = original.convert("RGB")
    rows = []
    with tempfile.TemporaryDirectory(prefix="decode-speed-") as tmp:
        for width, height in args.sizes:
            path = make_photo(source, width, height, args.noise, args.quality, Path(tmp) / f"retina-{width}x{height}.jpg")
            t_draft = measure(lambda path=path: draft(path), args.repeats, args.warmup)
            t_full = measure(lambda path=path: full(path), args.repeats, args.warmup)
            small = shrunk(path, 512, args.quality)
            t_small = measure(lambda small=small: draft(small), args.repeats, args.warmup)
            t_floor = measure(lambda path=path: smallest_scale_decode(path), args.repeats, args.warmup)
            raw_draft, raw_full = draft(path), full(path)
            diff = np.abs(raw_draft.astype(np.int16) - raw_full.astype(np.int16))
            ref, drafted, copy = model.run(np.stack([raw_full, raw_draft, draft(small)]))
            decoded = decode(path, draft_size=draft_size).image.size
            rows.append([
                f"{width}x{height}",
                f"{width * height / 1e6:.1f}",
                f"{path.stat().st_size / 1e6:.2f}",
                f"{decoded[0]}x{decoded[1]}",
                f"{t_draft.rate(1):.2f}",
                f"{t_full.rate(1):.2f}",
                ratio(t_draft.rate(1), t_full.rate(1)),
                str(t_draft),
                str(t_full),
                f"{diff.mean():.2f}",
                f"{np.percentile(diff, 99):.0f}",
                int(diff.max()),
                ratio(t_small.rate(1), t_draft.rate(1)),
                ratio(t_small.rate(1), t_floor.rate(1)),
                f"{ref @ drafted:.4f}",
                f"{ref @ copy:.4f}",
            ])
    size = preprocess.size
    print(f"output {size}x{size} (detail {preprocess.detail_size or size} px); draft mode asks libjpeg for >= {draft_size}x{draft_size}; "
          f"JPEG quality {args.quality}, noise std {args.noise}; one thread; {args.repeats} timed runs each")
    print(format_table(["photo", "MP", "file MB", "draft decodes at", "draft img/s", "full img/s", "speed-up",
                 "draft median [range]", "full median [range]", "mean |diff|", "p99 |diff|", "max |diff|",
                 "raw vs 512 px", "1/8 decode alone vs 512 px", "cos draft", "cos 512 px"], rows))
    print("\nspeed-up = draft images/s / full images/s; |diff| = absolute difference of the two final "
          f"{size}x{size}x3 uint8 arrays, grey levels (0-255); differences above ~64 are "
          "field-of-view edge pixels one path's mask keeps and the other sets to 128;\n"
          "raw vs 512 px = the cost of the raw photo (draft decode + preprocess) over that of the same photo "
          "pre-shrunk to 512 px on its short side; 1/8 decode alone = decoding the raw file at libjpeg's "
          "smallest scale and nothing else, over the whole 512 px path; cos = cosine of the model's embedding of the "
          "draft path / of the 512 px copy to that of the full decode")


if __name__ == "__main__":
    main()
